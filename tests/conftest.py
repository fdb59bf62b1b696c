"""Make the repository's top-level packages (compiler, passes, runtime) importable in tests
without installing the project."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
