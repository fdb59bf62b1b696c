"""Where a program's time goes: the per-layer seconds that ``execute(..., stats=...)`` measures,
summed over batches and printed as a table (``qlower run --profile``).

Each layer is shown with its kind (``conv 3x3 s2``, ``conv dw 3x3``, ``conv 1x1``, ``gemm``, or
the op), its output shape per sample, its multiply-accumulates per sample and the rate it ran at:

    MAC(conv)   = prod(output shape per sample) * (C_in / group) * kh * kw
    MAC(gemm)   = prod(output shape per sample) * K   (K: the weight's input width)
    MAC(matmul) = prod(output shape per sample) * K   (K: the first input's last dim)
    GMAC/s      = MAC per sample * samples / seconds / 1e9

Layers without products (add, pools, shape ops, float layers) show no MAC count.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .ir import Layer, Program


def _per_sample(program: Program, tensor: str) -> tuple[int, ...]:
    return tuple(program.tensors[tensor].shape[1:])


def layer_kind(layer: Layer) -> str:
    """A short name of what the layer computes: the op, with a conv's kernel, depthwise-ness and
    stride (``conv dw 3x3 s2``)."""
    if layer.op != "conv" or "weight" not in layer.params:
        return layer.op
    w = np.shape(layer.params["weight"])
    group = int(layer.attrs.get("group", 1))
    depthwise = group > 1 and w[1] == 1  # one input channel per group
    strides = [int(s) for s in layer.attrs.get("strides", [1] * (len(w) - 2))]
    text = "conv " + ("dw " if depthwise else "") + "x".join(str(k) for k in w[2:])
    if any(s != 1 for s in strides):
        text += " s" + "x".join(str(s) for s in sorted(set(strides)))
    return text


def layer_macs(program: Program, layer: Layer) -> int:
    """Multiply-accumulates per sample of a conv, gemm or matmul layer (0 for other layers)."""
    outputs = int(np.prod(_per_sample(program, layer.outputs[0]), dtype=np.int64))
    if layer.op == "conv" and "weight" in layer.params:
        return outputs * int(np.prod(np.shape(layer.params["weight"])[1:], dtype=np.int64))
    if layer.op == "gemm" and "weight" in layer.params:
        return outputs * int(np.shape(layer.params["weight"])[-1])
    if layer.op == "matmul":
        return outputs * int(program.tensors[layer.inputs[0]].shape[-1])
    return 0


@dataclass
class Profile:
    """Per-layer seconds summed over the batches of a run. ``add`` takes one ``execute`` call's
    ``stats`` and its batch size. The first batch also prepares each layer's weights (float
    copies, chunk plans), so it is left out of the sums once a second batch has run."""

    program: Program
    first: tuple[dict, int] | None = None  # the first batch's (layer seconds, samples)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    samples: int = 0
    batches: int = 0

    def add(self, stats: dict, samples: int) -> None:
        if self.first is None:
            self.first = (dict(stats["layer_seconds"]), samples)
            return
        for name, s in stats["layer_seconds"].items():
            self.seconds[name] += s
        self.samples += samples
        self.batches += 1

    def _measured(self) -> tuple[dict[str, float], int, int, bool]:
        """(seconds, samples, batches, warm): the batches after the first, or the first alone."""
        if self.batches or self.first is None:
            return self.seconds, self.samples, self.batches, True
        return self.first[0], self.first[1], 1, False

    def rows(self) -> list[dict]:
        """One dict per layer, in program order: name, kind, shape, macs, seconds."""
        seconds = self._measured()[0]
        return [{"name": layer.name, "kind": layer_kind(layer), "shape": _per_sample(self.program, layer.outputs[0]),
                 "macs": layer_macs(self.program, layer), "seconds": seconds.get(layer.name, 0.0)}
                for layer in self.program.layers]

    def table(self, top: int | None = None) -> str:
        """The kinds by total time, then the layers, slowest first (``top`` of them)."""
        rows = self.rows()
        total = sum(r["seconds"] for r in rows)
        _, samples, batches, warm = self._measured()
        n = max(1, samples)
        which = ("after the first, which also prepares each layer's weights" if warm
                 else "the only one, which includes preparing each layer's weights: run more batches for steady-state times")
        lines = [(f"profile: {samples} samples in {batches} batch(es) ({which}); {total * 1e3:.1f} ms in layers, "
                  f"{total * 1e3 / n:.2f} ms/sample")]

        def rate(macs: int, seconds: float) -> str:
            return f"{macs * n / seconds / 1e9:8.1f}" if macs and seconds > 0 else f"{'-':>8}"

        def share(seconds: float) -> float:
            return 100.0 * seconds / total if total > 0 else 0.0

        kinds: dict[str, list] = {}
        for r in rows:
            entry = kinds.setdefault(r["kind"], [0, 0, 0.0])
            entry[0] += 1
            entry[1] += r["macs"]
            entry[2] += r["seconds"]
        lines.append(f"  {'kind':<16} {'layers':>6} {'MMAC':>9} {'ms/sample':>10} {'%':>6} {'GMAC/s':>8}")
        for kind, (count, macs, seconds) in sorted(kinds.items(), key=lambda kv: -kv[1][2]):
            lines.append(f"  {kind:<16} {count:>6} {macs / 1e6:>9.1f} {seconds * 1e3 / n:>10.3f} "
                         f"{share(seconds):>6.1f} {rate(macs, seconds)}")
        ranked = sorted(rows, key=lambda r: -r["seconds"])[:top]
        width = max([len("layer")] + [len(r["name"]) for r in ranked])
        lines.append(f"  {'layer':<{width}} {'kind':<16} {'output':<14} {'MMAC':>9} {'ms/sample':>10} {'%':>6} {'GMAC/s':>8}")
        for r in ranked:
            shape = "x".join(str(d) for d in r["shape"]) or "scalar"
            lines.append(f"  {r['name']:<{width}} {r['kind']:<16} {shape:<14} {r['macs'] / 1e6:>9.1f} "
                         f"{r['seconds'] * 1e3 / n:>10.3f} {share(r['seconds']):>6.1f} {rate(r['macs'], r['seconds'])}")
        if top is not None and len(rows) > top:
            lines.append(f"  ... {len(rows) - top} faster layer(s) not shown")
        return "\n".join(lines)
