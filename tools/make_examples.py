"""Regenerate the bundled example files under examples/ (byte-identical on every run):

- ``mobilenetv2_tiny.onnx``: the float model (``tools.model_zoo.mobilenetv2_tiny``, seed 0);
- ``mobilenetv2_tiny_calib.npz``: 16 image-like calibration samples (seed 0), key ``input``;
- ``mobilenetv2_tiny_eval.npz``: 16 other samples from the same distribution (seed 1).

    python -m tools.make_examples [--out-dir examples]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tools.model_zoo import calibration_samples, mobilenetv2_tiny, save_model, save_npz

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
NUM_CALIB = 16
NUM_EVAL = 16


def make_examples(out_dir: str | Path = EXAMPLES_DIR) -> list[Path]:
    """Write the example files into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = mobilenetv2_tiny(seed=0)
    paths = [out / "mobilenetv2_tiny.onnx", out / "mobilenetv2_tiny_calib.npz",
             out / "mobilenetv2_tiny_eval.npz"]
    save_model(model, paths[0])
    save_npz(paths[1], calibration_samples(model, NUM_CALIB, seed=0))
    save_npz(paths[2], calibration_samples(model, NUM_EVAL, seed=1))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.make_examples", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(EXAMPLES_DIR))
    args = parser.parse_args(argv)
    for path in make_examples(args.out_dir):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
