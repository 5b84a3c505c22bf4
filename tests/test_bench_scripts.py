"""Every benchmark script still imports: they reach into the tests' helpers, which move when tests do
(bench/workers.py broke that way once, unnoticed until someone ran it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_the_bench_script_imports(script, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)  # its measuring sits behind `if __name__ == "__main__"`
    assert callable(getattr(module, "main", None)), f"{script} has no main()"
