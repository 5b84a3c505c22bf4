"""Every benchmark script still imports: they reach into the tests' helpers, which move when tests do
(bench/workers.py broke that way once, unnoticed until someone ran it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(monkeypatch, name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)  # its measuring sits behind `if __name__ == "__main__"`
    return module


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("*.py")))
def test_the_bench_script_imports(script, monkeypatch):
    assert callable(getattr(bench_module(monkeypatch, script), "main", None)), f"{script}.py has no main()"


def test_the_real_checkpoint_bench_runs_the_recipe_in_bf16_beside_its_files(monkeypatch, tmp_path):
    real = bench_module(monkeypatch, "real_checkpoint")
    recipe = real.in_dtype(str(BENCH.parent / "recipes" / "smollm2" / "recipe.yml"), "bfloat16", tmp_path)
    text = Path(recipe).read_text()
    assert "base_model: prepared:smollm2@bfloat16\n" in text and "prepared:smollm2@bfloat16+adapters/digits" in text
    assert "\ndtype: bfloat16\n" in text and "dtype: float32" not in text
    assert (tmp_path / "adapters" / "digits").resolve() == BENCH.parent / "recipes" / "smollm2" / "adapters" / "digits"


@pytest.mark.parametrize("section", ["weights", "routing", "fitness"])
def test_the_search_quality_bench_runs_and_its_dfs_target_is_reachable(section, tmp_path, monkeypatch):
    """A tiny run of each section prints its table; the routing problem's target path scores 1 when decoded."""
    import subprocess

    out = tmp_path / "table.md"
    extra = {"weights": ["--methods", "cma", "cycleqd"], "fitness": ["--budget", "3"]}.get(section, [])
    subprocess.run([sys.executable, str(BENCH / "search_quality.py"), "--section", section, "--trials", "8",
                    "--seeds", "0", "--markdown", str(out), *extra], check=True, capture_output=True)
    assert ("| sampler and mode |" if section == "fitness" else "| method |") in out.read_text()
    if section == "routing":
        sq = bench_module(monkeypatch, "search_quality")
        problem = sq.make_routing_problem(0, 6, 16, 8)
        assert problem.score(problem.path, "heldout") == 1.0
        assert max(problem.score(problem.own(m), "heldout") for m in ("A", "B")) < 0.6  # neither alone


def test_the_fitness_section_charges_each_example_once_and_estimates_the_mean(monkeypatch):
    """The budget counts an example of a candidate once however many rungs ask for it; a slice is the mean
    of its examples; anchors covering the split with equal weights give the whole split's score."""
    sq = bench_module(monkeypatch, "search_quality")
    problem = sq.make_problem(0, 3, 4, 8, 40, 100)
    scorer = sq.ExampleScores(problem, 0, sq.make_items(problem, 0, "acc"))
    delta = problem.tau[0]
    whole = scorer.per_example(delta, "search")
    half = scorer.score(("c", delta), fraction=0.5)
    assert scorer.spent == 2 * 20
    assert half.values["a/acc,none"] == pytest.approx(whole["a/acc,none"][scorer.order["a"][:20]].mean())
    full = scorer.score(("c", delta))
    assert scorer.spent == 2 * 40  # the first half was not charged again
    every = {k: sq.AnchorSet(list(range(40)), [1 / 40] * 40) for k in whole}
    assert scorer.score(("c", delta), anchors=every).values == pytest.approx(full.values)
    assert scorer.spent == 2 * 40
    assert set(whole["a/acc,none"]) <= {0.0, 1.0}
    assert len(scorer.per_example(delta, "heldout")["a/acc,none"]) == 100
