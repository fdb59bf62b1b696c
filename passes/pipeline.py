"""The default pass pipeline: canonicalize, fold, fuse — repeated until nothing changes."""
from __future__ import annotations

import onnx

from .activation_fusion import FuseActivations
from .base import GraphPass, Instrument, PassManager, PipelineResult
from .batchnorm_folding import FoldBatchNorm
from .canonicalize import FoldPadIntoConv, NormalizeGemm
from .canonicalize_forms import (
    MatMulAddToGemm,
    PReluSlopePerChannel,
    SimplifyCasts,
    SumToAdd,
)
from .cleanup import NameNodes, RemoveDeadCode, RemoveIdentity
from .constant_folding import FoldConstants
from .elementwise_fusion import FuseElementwiseChains


def exporter_forms() -> list[GraphPass]:
    """Canonical forms of exporter output (passes/canonicalize_forms.py): Cast chains, Sum as
    Add, per-channel PRelu slopes of old opsets, MatMul + Add as Gemm."""
    return [SimplifyCasts(), SumToAdd(), PReluSlopePerChannel(), MatMulAddToGemm()]


def default_passes() -> list[GraphPass]:
    """The passes in their written order: names first (everything after refers to nodes by
    name), then cleanup and folding, the exporter forms (``exporter_forms``), BatchNorm folding,
    Gemm normalization (alpha = beta = 1, 1-D bias), a zero Pad folded into the Conv after it,
    elementwise-chain fusion (lookup tables; before activation fusion, which leaves a chain's
    nodes alone), and activation fusion last (it annotates the producers that BatchNorm folding
    leaves)."""
    return [NameNodes(), RemoveIdentity(), FoldConstants(), *exporter_forms(), RemoveDeadCode(),
            FoldBatchNorm(), NormalizeGemm(), FoldPadIntoConv(), FuseElementwiseChains(), FuseActivations()]


def run_default_pipeline(model: onnx.ModelProto, instruments: tuple[Instrument, ...] = (),
                         max_rounds: int = 4) -> PipelineResult:
    """Run ``default_passes`` round after round until a round changes nothing (at most
    ``max_rounds``; ``converged`` says whether the fixed point was reached)."""
    return PassManager(default_passes(), max_rounds=max_rounds, instruments=tuple(instruments)).run(model)
