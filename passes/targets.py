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

    @property
    def shift_only(self) -> bool:
        return self.multiplier_bits == 0


TARGETS: dict[str, TargetPreset] = {
    "mmav2": TargetPreset(
        name="mmav2",
        description="AM62A/AM67A/AM68A/AM69A class: per-channel int8 weights, non-power-of-2 scales, multiplier+shift requant",
        weight_bits=8,
        activation_bits=8,
        per_channel_weights=True,
        power_of_two=False,
        symmetric_activations=True,
        unsigned_after_relu=True,
        multiplier_bits=31,
        bias_dtype="int32",
    ),
    "mmav1": TargetPreset(
        name="mmav1",
        description="TDA4VM class: per-tensor int8 weights, power-of-2 scales, shift-only requant",
        weight_bits=8,
        activation_bits=8,
        per_channel_weights=False,
        power_of_two=True,
        symmetric_activations=True,
        unsigned_after_relu=True,
        multiplier_bits=0,
        bias_dtype="int32",
    ),
}


def get_target(name: str, bits: int = 8) -> TargetPreset:
    """The preset ``name`` at ``bits`` (8 or 16) for weights and activations."""
    if name not in TARGETS:
        raise ValueError(f"unknown target '{name}'; choose one of {', '.join(sorted(TARGETS))}")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    preset = TARGETS[name]
    if bits == 8:
        return preset
    return replace(preset, weight_bits=16, activation_bits=16, bias_dtype="int64")
