"""The installed command is this package's, says so, and teaches through --help."""

import shutil
import subprocess
import sys


def test_console_script_is_ours():
    exe = shutil.which("mergekit-evolve")
    assert exe, "mergekit-evolve is not on PATH: install the package (pip install -e .)"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    assert "evolutionary merge search" in out and "not mergekit's deprecated" in out


def test_module_entry_point_and_help():
    out = subprocess.run([sys.executable, "-m", "mergekit_evolve", "run", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--run-dir", "--trials", "--dry-run", "--overwrite", "--trust-remote-code", "--allow-pickle"):
        assert flag in out
