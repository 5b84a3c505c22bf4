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


@pytest.mark.parametrize("section", ["weights", "routing"])
def test_the_search_quality_bench_runs_and_its_dfs_target_is_reachable(section, tmp_path, monkeypatch):
    """A tiny run of each section prints its table; the routing problem's target path scores 1 when decoded."""
    import subprocess

    out = tmp_path / "table.md"
    subprocess.run([sys.executable, str(BENCH / "search_quality.py"), "--section", section, "--trials", "8",
                    "--seeds", "0", "--markdown", str(out)]
                   + (["--methods", "cma", "cycleqd"] if section == "weights" else []),
                   check=True, capture_output=True)
    assert "| method |" in out.read_text()
    if section == "routing":
        spec = importlib.util.spec_from_file_location("bench_search_quality", BENCH / "search_quality.py")
        sq = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, sq)
        spec.loader.exec_module(sq)
        problem = sq.make_routing_problem(0, 6, 16, 8)
        assert problem.score(problem.path, "heldout") == 1.0
        assert max(problem.score(problem.own(m), "heldout") for m in ("A", "B")) < 0.6  # neither alone
