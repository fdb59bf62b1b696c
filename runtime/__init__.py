"""qlower's reference runtime: the integer IR, its file format and a bit-exact executor (numpy only)."""
from .errors import ProgramError
from .executor import execute, run_layer
from .ir import IR_VERSION, Layer, Program, TensorInfo
from .serialize import load_program, save_program
from .text import program_to_text

__all__ = [
    "IR_VERSION",
    "Layer",
    "Program",
    "ProgramError",
    "TensorInfo",
    "execute",
    "load_program",
    "program_to_text",
    "run_layer",
    "save_program",
]
