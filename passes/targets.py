"""The accelerator targets as one table of pure data.

Every pass and compiler stage that needs to know what a target supports reads this table (as
torch's ``BackendConfig`` does); nothing else encodes target behaviour.

Fields
------
weight_bits, activation_bits
    integer width of weights and activations (8 or 16).
per_channel_weights
    symmetric weight scale per output channel (True) or one per tensor (False).
power_of_two
    every scale is rounded up to a power of two (TDA4VM), so requantization is a pure shift.
symmetric_activations
    activation zero point is 0 (int8), or 0 on the unsigned type when the tensor is non-negative.
unsigned_after_relu
    a non-negative activation (after ReLU/ReLU6, or calibrated >= 0) uses the unsigned type.
multiplier_bits
    width of the requantization multiplier m (m / 2^k ~= s_x * s_w / s_y); 0 means shift-only
    (m = 1).
bias_dtype
    integer type of the bias, added to the accumulator.
requant_rounding
    rounding of ``(acc * m) >> k``: ``half_up`` adds 2^(k-1) before the arithmetic shift.
pool_multiplier_bits
    multiplier width for an average pool's divisor on a shift-only target (s_x / (s_y * D) is
    not a power of two when D is not).
depthwise_per_channel
    per-channel weight scales for depthwise convs even when ``per_channel_weights`` is False
    (TIDL's flag for TDA4VM; still power-of-2 per channel there).
layers_16bit
    ONNX node names whose outputs and weights are 16-bit while the rest stays at the preset's
    width (TIDL's ``output_feature_16bit_names_list``); ``for_layer`` gives their preset.

The 16-bit form (``get_target(name, 16)`` or a layer of ``layers_16bit``) has int16 weights and
activations and an int64 accumulator. Its bias is int64 (chosen by scale selection,
``compiler.scales.bias_dtype_for``, for every weighted layer with a 16-bit input or 16-bit
weights; the QDQ model reads it through Cast + Mul, since DequantizeLinear takes no int64). Its
multiplier has at least 16 bits (an 8-bit one would leave a gain error of up to 2^-9 in layers
without weights, about 48 dB, far above 16-bit rounding noise). Where an operand of a layer is
16-bit, the multiplier is capped at 16 bits (``layer_multiplier_bits``): a 16x16-bit accumulator
(~2^30 * K) times a 31-bit m could leave int64.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    weight_bits: int
    activation_bits: int
    per_channel_weights: bool
    power_of_two: bool
    symmetric_activations: bool
    unsigned_after_relu: bool
    multiplier_bits: int
    bias_dtype: str
    requant_rounding: str = "half_up"
    pool_multiplier_bits: int = 16
    depthwise_per_channel: bool = False
    layers_16bit: tuple[str, ...] = ()

    @property
    def shift_only(self) -> bool:
        return self.multiplier_bits == 0

    @property
    def bias_bits(self) -> int:
        return int(self.bias_dtype[3:])

    def wide(self) -> TargetPreset:
        """The 16-bit form of this preset (int16 weights and activations, a multiplier of at least
        16 bits where the preset has one). ``bias_dtype`` stays int32 here; scale selection gives
        the layers that need it an int64 bias (compiler.scales.bias_dtype_for)."""
        bits = self.multiplier_bits if self.shift_only else max(self.multiplier_bits, 16)
        return replace(self, weight_bits=16, activation_bits=16, bias_dtype="int32", multiplier_bits=bits)

    def for_layer(self, name: str) -> TargetPreset:
        """The preset a layer uses: the 16-bit form for a layer named in ``layers_16bit``."""
        return self.wide() if name in self.layers_16bit and self.weight_bits == 8 else self

    def layer_multiplier_bits(self, *dtypes: str) -> int:
        """Multiplier width of a layer whose operands (input, weight) have these dtypes: the
        preset's, capped at 16 bits when any operand is 16-bit (int64 accumulator headroom)."""
        if self.multiplier_bits > 16 and any(d.endswith("16") for d in dtypes):
            return 16
        return self.multiplier_bits


TARGETS: dict[str, TargetPreset] = {
    "mmav2": TargetPreset(
        name="mmav2",
        description="AM62A/AM67A/AM68A/AM69A class: per-channel int8 weights, non-power-of-2 scales, 8-bit multiplier+shift requant",
        weight_bits=8,
        activation_bits=8,
        per_channel_weights=True,
        power_of_two=False,
        symmetric_activations=True,
        unsigned_after_relu=True,
        multiplier_bits=8,
        bias_dtype="int32",
    ),
    "mmav1": TargetPreset(
        name="mmav1",
        description="TDA4VM class: per-tensor int8 weights, power-of-2 scales, shift-only requant, int16 bias",
        weight_bits=8,
        activation_bits=8,
        per_channel_weights=False,
        power_of_two=True,
        symmetric_activations=True,
        unsigned_after_relu=True,
        multiplier_bits=0,
        # int16, as TDA4VM adds it: measured against int32 it costs nothing on the builder's models
        # and 0.13 dB on EfficientNet-Lite0 (1.17 vs 1.30 dB; the worst layer loses 2 weight bits,
        # listed in the compile report), and a program for this target must be one it can run.
        bias_dtype="int16",
    ),
}


MULTIPLIER_BITS_CHOICES = (8, 16, 31)
BIAS_BITS_CHOICES = (16, 32)


def get_target(name: str, bits: int = 8, *, multiplier_bits: int | None = None, bias_bits: int | None = None,
               asymmetric: bool = False, depthwise_per_channel: bool = False,
               layers_16bit=()) -> TargetPreset:
    """The preset ``name`` at ``bits`` (8 or 16) with the per-compile options applied.

    ``multiplier_bits`` (8, 16, 31; mmav2 only, mmav1 is shift-only), ``bias_bits`` (16 or 32),
    ``asymmetric`` activations (mmav2 only: mmav1 is symmetric power-of-2), per-channel weights for
    depthwise convs, and the names of layers kept in 16 bits. ValueError names a bad option.
    """
    if name not in TARGETS:
        raise ValueError(f"unknown target '{name}'; choose one of {', '.join(sorted(TARGETS))}")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    preset = TARGETS[name]
    changes: dict = {}
    if multiplier_bits is not None:
        if multiplier_bits not in MULTIPLIER_BITS_CHOICES:
            raise ValueError(f"multiplier bits must be one of {MULTIPLIER_BITS_CHOICES}, got {multiplier_bits}")
        if preset.shift_only:
            raise ValueError(f"target '{name}' requantizes by shifts only (power-of-2 scales); "
                             "--multiplier-bits applies to mmav2")
        changes["multiplier_bits"] = multiplier_bits
    if bias_bits is not None:
        if bias_bits not in BIAS_BITS_CHOICES:
            raise ValueError(f"bias bits must be one of {BIAS_BITS_CHOICES}, got {bias_bits}")
        changes["bias_dtype"] = f"int{bias_bits}"
    if asymmetric:
        if preset.power_of_two:
            raise ValueError(f"target '{name}' has symmetric power-of-2 activations; --asymmetric applies to mmav2")
        changes["symmetric_activations"] = False
    if depthwise_per_channel:
        changes["depthwise_per_channel"] = True
    if layers_16bit:
        changes["layers_16bit"] = tuple(layers_16bit)
    preset = replace(preset, **changes)
    return preset.wide() if bits == 16 else preset
