"""bench/search_quality.py in a tiny configuration: every method runs, the table is written, and
CycleQD's candidates there carry their mutated ancestors as the plugin methods do."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "search_quality.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("search_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["search_quality"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_method_runs_and_the_table_has_a_row_each(bench):
    problem = bench.make_problem(0, experts=3, layers=3, d=4, inputs=4)
    runs = [bench.run(problem, m, seed, trials=10, points=2) for m in bench.METHODS for seed in (0, 1)]
    for r in runs:
        assert len(r.search) == len(r.heldout) == 10 and all(0.0 <= s <= 1.0 for s in r.search + r.heldout)
    text = bench.table(runs, list(bench.METHODS), [0, 1], problem)
    assert all(f"| {m} |" in text for m in bench.METHODS) and "best expert alone" in text


def test_the_best_merge_is_far_from_the_middle_of_the_box(bench):
    problem = bench.make_problem(0, experts=5, layers=8, d=16, inputs=8)
    middle = bench.gradient_delta(problem, {f"e{k}.g{i}": 0.5 for k in range(5) for i in range(6)}, 6)
    experts = [np.mean(list(problem.scores(problem.tau[k], "heldout").values())) for k in range(5)]
    assert np.mean(list(problem.scores(middle, "heldout").values())) < 0.5 and max(experts) < 0.45


def test_cycleqd_children_inherit_in_the_bench(bench):
    problem = bench.make_problem(0, experts=3, layers=3, d=4, inputs=4)
    r = bench.run(problem, "cycleqd_paper", 0, trials=12, points=2)
    assert len(r.search) == 12
    interval = bench.interval([0.5, 0.6, 0.7])
    assert interval[0] == pytest.approx(0.6) and interval[1] == pytest.approx(4.302653 * 0.1 / 3**0.5, rel=1e-5)
