"""The README's two set-up commands, run as a test: the compile-and-run example (without the pip
install, which the test environment has already done) and the test command that .ci/run uses."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section)


def test_readme_has_exactly_two_setup_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].startswith('pip install -e ".[test]" && qlower compile ')
    assert commands[1] == "python -m pytest -q"
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_example_compiles_and_reports_accuracy(tmp_path):
    compile_part = readme_commands()[0].split("&&", 1)[1].strip()
    argv = shlex.split(compile_part)
    assert argv[0] == "qlower"
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    exe = shutil.which("qlower")
    cmd = [exe] + argv[1:] if exe else [sys.executable, "-m", "compiler.cli"] + argv[1:]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "integer program (qlower runtime)" in done.stdout and " dB" in done.stdout
    assert (tmp_path / "out" / "model.qir").is_file() and (tmp_path / "out" / "model.qdq.onnx").is_file()
