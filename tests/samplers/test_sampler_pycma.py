"""sampler: cma (pycma behind Optuna): generations handed out and told whole, the step is pycma's, replay on resume."""

import cma
import numpy as np
import pytest
from sampler_harness import new_study, run_study, settings

from mergekit_evolve.recipe.search_space import Dimension, SearchSpace
from mergekit_evolve.samplers.generations import MEMBER_ATTR
from mergekit_evolve.samplers.pycma import PyCmaSampler
from mergekit_evolve.samplers.registry import SamplerSetupError, make_sampler


def space(*dims: Dimension) -> SearchSpace:
    return SearchSpace(dimensions={d.name: d for d in dims})


BOX = space(
    Dimension("w1", "float", low=0.0, high=1.0, init=0.25), Dimension("w2", "float", low=-1.0, high=3.0),
    Dimension("lr", "float", low=1e-4, high=1e-1, log=True), Dimension("k", "int", low=2, high=9),
)


def sphere(params):
    return {"a/acc,none": -((params["w1"] - 0.7) ** 2) - (params["w2"] - 2.0) ** 2 / 16
            - (np.log10(params["lr"]) + 2) ** 2 / 9 - (params["k"] - 6) ** 2 / 49}


def reference_es(sampler: PyCmaSampler, x0, sigma0, popsize):
    """pycma configured as the sampler documents: unit box, its own seeded RandomState."""
    randn = np.random.RandomState(np.random.MT19937(np.random.default_rng([sampler._seed, 2, 0]).integers(2**32))).randn
    return cma.CMAEvolutionStrategy(list(x0), sigma0, {"bounds": [0.0, 1.0], "seed": np.nan, "randn": randn,
                                                       "verbose": -9, "verb_log": 0, "popsize": popsize})


def test_generations_are_pycmas_ask_and_tell_on_the_unit_box():
    evolve = settings("a", sampler="cma", seed=7, sampler_options={"popsize": 6, "sigma0": 0.2})
    sampler = make_sampler(evolve, BOX)
    study = run_study(sampler, BOX.distributions(), sphere, evolve, trials=12)
    x0 = [(0.25 - 0.0) / 1.0, 0.5, 0.5, 0.5]  # the init value, else mid-range (log dims in log space)
    es = reference_es(sampler, x0, 0.2, 6)
    box = sampler.box
    for g in range(2):
        xs = es.ask()
        members = study.trials[6 * g: 6 * g + 6]
        assert [t.system_attrs[MEMBER_ATTR] for t in members] == [[g, i] for i in range(6)]
        for x, t in zip(xs, members, strict=False):
            assert t.params == box.decode(x)
            assert 1e-4 <= t.params["lr"] <= 1e-1 and isinstance(t.params["k"], int) and 2 <= t.params["k"] <= 9
        es.tell(xs, [-t.value for t in members])  # pycma minimises the negated objective
    sampler.sync(study)
    assert sampler._learned == 2
    assert np.allclose(sampler.run.es.mean, es.mean) and sampler.run.es.sigma == pytest.approx(es.sigma)


def test_tell_waits_for_the_whole_generation():
    evolve = settings("a", sampler="cma", seed=1, sampler_options={"popsize": 4})
    sampler = make_sampler(evolve, BOX)
    study = new_study(sampler, evolve)
    dists = BOX.distributions()
    asked = [study.ask(dists) for _ in range(4)]
    for t in asked[:3]:
        study.tell(t, 0.5)
    extra = study.ask(dists)  # every member is out and one is unfinished: no tell yet
    assert sampler._learned == 0
    # in-memory storage has no heartbeat to fail a dead worker's trial, so the unfinished member is re-run
    assert study.trials[-1].system_attrs[MEMBER_ATTR] == [0, 3] and extra.params == asked[3].params
    study.tell(asked[3], 0.2)
    study.tell(extra, 0.2)
    study.ask(dists)
    assert sampler._learned == 1 and study.trials[-1].system_attrs[MEMBER_ATTR] == [1, 0]


def test_replay_rebuilds_the_same_state_whatever_numpy_global_stream_does():
    evolve = settings("a", sampler="cma", seed=3)
    sampler = make_sampler(evolve, BOX)
    study = run_study(sampler, BOX.distributions(), sphere, evolve, trials=25)
    np.random.seed(12345)
    np.random.rand(100)
    again = make_sampler(evolve, BOX)
    again.sync(study)
    sampler.sync(study)
    assert again._learned == sampler._learned > 0
    assert np.array_equal(again.run.es.mean, sampler.run.es.mean)
    more = run_study(again, BOX.distributions(), sphere, evolve, trials=3, study=study)
    assert len(more.trials) == 28
    assert more.best_value >= max(t.value for t in study.trials[:5])


def test_failed_members_rank_last():
    assert PyCmaSampler.fitness([0.3, None, 0.9]) == [-0.3, 0.7, -0.9]
    assert PyCmaSampler.fitness([None, None]) == [0.0, 0.0]


def flat_run(strategy):
    flat = space(*(Dimension(f"x{i}", "float", low=0.0, high=1.0) for i in range(3)))
    evolve = settings("a", sampler="cma", seed=0, sampler_options={"restarts": 3, "restart_strategy": strategy})
    sampler = make_sampler(evolve, flat)
    # a flat objective: pycma's tolflatfitness stops each run after a few generations
    run_study(sampler, flat.distributions(), lambda p: {"a/acc,none": 0.5}, evolve, trials=400)
    assert len(sampler.runs) == 4
    return sampler


def test_ipop_restarts_double_the_population():
    sampler = flat_run("ipop")
    popsize0 = 4 + int(3 * np.log(3))
    assert [int(r.es.popsize) for r in sampler.runs] == [popsize0, 2 * popsize0, 4 * popsize0, 8 * popsize0]
    assert {r.sigma0 for r in sampler.runs} == {1 / 6}
    assert all(r.es.mean.tolist() != sampler.runs[0].es.mean.tolist() for r in sampler.runs[1:])


def test_bipop_interleaves_small_local_runs_by_budget():
    sampler = flat_run("bipop")
    popsize0 = int(sampler.runs[0].es.popsize)
    small = large = 0
    large_runs = 0
    for previous, run in zip(sampler.runs, sampler.runs[1:], strict=False):
        if previous.kind == "large":
            large += previous.evaluations
        else:  # the first run is accounted as a small one (cma.fmin)
            small += previous.evaluations
        if small < max(1, large):
            assert run.kind == "small" and run.sigma0 < 1 / 6 and 2 <= run.es.popsize <= popsize0 * 2**large_runs
        else:
            large_runs += 1
            assert run.kind == "large" and run.sigma0 == 1 / 6 and run.es.popsize == popsize0 * 2**large_runs
    assert {r.kind for r in sampler.runs[1:]} == {"small", "large"}


def test_categorical_and_one_dimensional_spaces_are_refused():
    evolve = settings("a", sampler="cma")
    with pytest.raises(SamplerSetupError, match=r"categorical dimensions \['merge_method'\]"):
        make_sampler(evolve, space(Dimension("merge_method", "categorical", choices=("ties", "dare_ties")),
                                   Dimension("w", "float", low=0.0, high=1.0)))
    with pytest.raises(SamplerSetupError, match="at least two search dimensions.*has 1 .w.*tpe"):
        make_sampler(evolve, space(Dimension("w", "float", low=0.0, high=1.0)))
    with pytest.raises(SamplerSetupError, match="optimises one value"):
        make_sampler(settings("a", "b", sampler="cma", multi_objective=True), BOX)


def test_unit_box_round_trip():
    sampler = make_sampler(settings("a", sampler="cma"), BOX)
    params = {"w1": 0.25, "w2": 2.0, "lr": 1e-3, "k": 5}
    x = sampler.box.encode(params)
    assert x == pytest.approx([0.25, 0.75, 1 / 3, 3 / 7])
    back = sampler.box.decode(x)
    assert back["k"] == 5 and back["lr"] == pytest.approx(1e-3) and back["w2"] == pytest.approx(2.0)
    assert (sampler.box.decode(np.array([1.3, -0.2, 0.0, 1.0]))
            == {"w1": 1.0, "w2": -1.0, "lr": pytest.approx(1e-4), "k": 9})
