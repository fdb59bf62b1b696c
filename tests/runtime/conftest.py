"""Makes the repository importable and registers helpers.py under a unique module name
(tests/ has no __init__.py files, so a bare ``import helpers`` could pick another folder's)."""
import importlib.util
import pathlib
import sys

_HERE = pathlib.Path(__file__).resolve().parent
_ROOT = _HERE.parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

_spec = importlib.util.spec_from_file_location("runtime_test_helpers", _HERE / "helpers.py")
_helpers = importlib.util.module_from_spec(_spec)
sys.modules["runtime_test_helpers"] = _helpers
_spec.loader.exec_module(_helpers)
