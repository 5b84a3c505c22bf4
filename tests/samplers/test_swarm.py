"""Model Swarms: the paper's update rules, checked against hand computations; the sampler on a study."""

import numpy as np
import pytest
from sampler_harness import expert_space, run_study, settings

from mergekit_evolve.samplers.generations import MEMBER_ATTR, Outcome, stream
from mergekit_evolve.samplers.registry import SamplerSetupError, make_sampler
from mergekit_evolve.samplers.swarm import UNBOUNDED, Swarm, initial_swarm, swarm_space, velocity

PHI = (0.4, 0.3, 0.3, 0.3)


def test_velocity_is_the_papers_formula():
    v, x, p = np.array([0.1, -0.2]), np.array([0.5, 0.5]), np.array([0.6, 0.4])
    g, g_w = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    r = np.array([0.5, 0.25, 1.0, 0.2])
    # C = 0.5*0.4 + 0.25*0.3 + 1.0*0.3 + 0.2*0.3 = 0.635
    # numerator = 0.2 v + 0.075 (p - x) + 0.3 (g - x) - 0.06 (g_w - x) = [0.2075, -0.2275]
    assert velocity(v, x, p, g, g_w, PHI, r) == pytest.approx([0.2075 / 0.635, -0.2275 / 0.635])


def test_initial_swarm_crosses_over_the_growing_pool_with_velocity_toward_another():
    x, v = initial_swarm(3, 6, np.random.default_rng(11))
    rng = np.random.default_rng(11)  # the same draws, in the documented order
    expected = [np.eye(3)[j] for j in range(3)]
    for _ in range(3):
        a, b = rng.choice(len(expected), size=2, replace=False)  # experts and earlier crossovers
        w = rng.uniform(0.0, 2.0)
        assert 0.0 <= w < 2.0
        expected.append(w * expected[a] + (1 - w) * expected[b])
    assert np.allclose(x, expected)
    for i in range(6):
        j = rng.choice([k for k in range(6) if k != i])
        assert np.allclose(v[i], x[j] - x[i])


def test_initial_velocities_come_from_the_positions_the_swarm_starts_at():
    # with a box, a crossover outside it starts on the box's edge, and velocities are built from there
    x, v = initial_swarm(2, 8, np.random.default_rng(4), low=-0.25, high=1.25)
    assert x.min() >= -0.25 and x.max() <= 1.25 and (np.isclose(x, -0.25) | np.isclose(x, 1.25)).any()
    rng = np.random.default_rng(4)
    pool = [np.eye(2)[0], np.eye(2)[1]]
    for _ in range(6):
        a, b = rng.choice(len(pool), size=2, replace=False)
        w = rng.uniform(0.0, 2.0)
        pool.append(np.clip(w * pool[a] + (1 - w) * pool[b], -0.25, 1.25))
    assert np.allclose(x, pool)
    for i in range(8):
        j = rng.choice([k for k in range(8) if k != i])
        assert np.allclose(v[i], pool[j] - pool[i])


def _sampler(n=2, low=-1.0, high=2.0, **options):
    evolve = settings("a", sampler="swarm", seed=5, sampler_options=options)
    space = swarm_space(expert_space(n, low, high), evolve.sampler_options)  # as prepare_recipe widens it
    return make_sampler(evolve, space), space, evolve


def test_move_applies_velocity_step_and_decay_by_hand():
    sampler, _, _ = _sampler(particles=2)
    s = Swarm(
        x=np.array([[0.2, 0.3], [0.9, -0.4]]), v=np.array([[0.1, 0.0], [-0.2, 0.3]]),
        p=np.array([[0.1, 0.5], [1.0, -0.5]]), p_utility=np.array([0.3, 0.4]), step=1.0,
        g=np.array([1.0, -0.5]), g_utility=0.4, g_w=np.array([0.0, 0.0]), g_w_utility=0.1,
        stale=np.zeros(2, int),
    )
    x0, v0 = s.x.copy(), s.v.copy()
    sampler.move(s, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    for i in range(2):
        r_v, r_p, r_g, r_w = rng.uniform(0.0, 1.0, 4)
        c = r_v * 0.4 + r_p * 0.3 + r_g * 0.3 + r_w * 0.3
        v = (r_v * 0.4 * v0[i] + r_p * 0.3 * (s.p[i] - x0[i]) + r_g * 0.3 * (s.g - x0[i])
             - r_w * 0.3 * (s.g_w - x0[i])) / c
        assert s.v[i] == pytest.approx(v)
        assert s.x[i] == pytest.approx(x0[i] + 1.0 * v)
    assert s.step == pytest.approx(0.95)
    s.step = 0.104
    sampler.move(s, np.random.default_rng(4))
    assert s.step == 0.1  # lambda <- max(0.95 lambda, 0.1)


def test_initial_crossovers_outside_the_recipe_range_are_searched_as_they_are():
    # a [0, 1] recipe: crossovers w p1 + (1 - w) p2 with w in [0, 2) leave [0, 1]; none is clipped
    sampler, space, _ = _sampler(n=3, low=0.0, high=1.0, particles=20)
    assert all((d.low, d.high) == (-5.0, 5.0) for d in space.dimensions.values())
    plan = sampler._plan(0)
    x, _ = initial_swarm(3, 20, stream(5, 0))
    assert (x < 0).any() and (x > 1).any()  # extrapolations, as the paper's
    assert np.allclose([[p[f"v{i}.weight"] for i in (1, 2, 3)] for p in plan], x)


def test_moves_leave_the_recipe_range():
    sampler, _, _ = _sampler(low=0.0, high=1.0)
    s = Swarm(x=np.array([[0.9, 0.1]]), v=np.array([[2.0, -2.0]]), p=np.array([[0.9, 0.1]]),
              p_utility=np.array([0.0]), step=1.0, g=np.array([0.9, 0.1]), g_w=np.array([0.9, 0.1]),
              stale=np.zeros(1, int))
    sampler.move(s, np.random.default_rng(0))
    r_v, r_p, r_g, r_w = np.random.default_rng(0).uniform(0.0, 1.0, 4)
    # p = g = g_w = x: only the inertia term moves it
    c = r_v * 0.4 + r_p * 0.3 + r_g * 0.3 + r_w * 0.3
    v = r_v * 0.4 * np.array([2.0, -2.0]) / c
    assert s.x[0] == pytest.approx(np.array([0.9, 0.1]) + v)
    assert s.x[0][0] > 1.0 and s.x[0][1] < 0.0


def test_box_null_is_unbounded_and_a_narrow_box_clips():
    sampler, space, _ = _sampler(low=0.0, high=1.0, box=None)
    assert sampler.low == -UNBOUNDED and all(d.high == UNBOUNDED for d in space.dimensions.values())
    sampler, _, _ = _sampler(low=0.0, high=1.0, box=[0.0, 1.0])  # the old behaviour, when asked for
    s = Swarm(x=np.array([[0.9, 0.1]]), v=np.array([[5.0, -5.0]]), p=np.array([[0.9, 0.1]]),
              p_utility=np.array([0.0]), step=1.0, stale=np.zeros(1, int))
    sampler.move(s, np.random.default_rng(0))
    assert s.x.min() >= 0.0 and s.x.max() <= 1.0
    with pytest.raises(ValueError, match=r"box \[0.5, 1.0\] must include \[0, 1\]"):
        settings("a", sampler="swarm", sampler_options={"box": [0.5, 1.0]})


def test_an_unwidened_space_is_refused():
    evolve = settings("a", sampler="swarm")
    with pytest.raises(SamplerSetupError, match="prepare_recipe"):
        make_sampler(evolve, expert_space(2))


def test_paper_preset_pins_the_papers_numbers_and_written_options_win():
    options = settings("a", sampler="swarm", sampler_options={"preset": "paper", "patience": 4}).sampler_options
    assert options.box is None and options.patience == 4 and options.restart_fraction == 0.67
    assert (options.phi_v, options.phi_p, options.phi_g, options.phi_w) == PHI and options.particles == 20
    assert (options.step, options.step_decay, options.step_min, options.max_iterations) == (1.0, 0.95, 0.1, 200)
    assert options.given() == {"preset": "paper", "patience": 4}  # what a recipe writes, not the expansion


def outcome(i, u):
    return Outcome(trial=i, params={}, utility=u, qualities=None)


def test_bests_worst_particle_reset_and_swarm_restart():
    sampler, _, _ = _sampler(particles=2, patience=3, restart_fraction=0.6)
    sampler._plan(0)
    s = sampler.swarm
    start = s.x.copy()
    sampler._learn(0, [outcome(0, 0.5), outcome(1, 0.2)])
    assert s.started and s.iterations == 0
    assert np.allclose(s.g, start[0]) and s.g_utility == 0.5
    assert np.allclose(s.g_w, start[1]) and s.g_w_utility == 0.2
    assert np.allclose(s.p, start) and list(s.p_utility) == [0.5, 0.2]

    sampler._plan(1)
    moved = s.x.copy()
    sampler._learn(1, [outcome(2, 0.1), outcome(3, 0.9)])  # particle 1 finds a new global best; 0 gets worse
    assert np.allclose(s.g, moved[1]) and s.g_utility == 0.9
    assert np.allclose(s.g_w, moved[0]) and s.g_w_utility == 0.1
    assert np.allclose(s.p[0], start[0]) and list(s.stale) == [1, 0]
    assert s.since_best == 0

    sampler._plan(2)
    sampler._learn(2, [outcome(4, 0.0), outcome(5, None)])  # a failed particle changes no best
    # stale[0] = 2 >= 0.6 * 3: particle 0 goes back to its best with zero velocity
    assert np.allclose(s.x[0], start[0]) and np.allclose(s.v[0], 0.0) and s.stale[0] == 0
    assert s.g_utility == 0.9 and s.g_w_utility == 0.0 and s.since_best == 1

    sampler._plan(3)
    sampler._learn(3, [outcome(6, 0.0), outcome(7, 0.0)])
    assert sampler.swarm is s and s.since_best == 2
    sampler._plan(4)
    sampler._learn(4, [outcome(8, 0.0), outcome(9, 0.0)])
    assert sampler.swarm is None and sampler.restarts == 1  # g unchanged for `patience` iterations
    fresh = sampler._plan(5)
    assert len(fresh) == 2 and sampler.swarm.step == 1.0


def concave(params):
    # best at weights (0.7, 0.5, 0.2): a merge beats every expert (one-hot)
    target = {"v1.weight": 0.7, "v2.weight": 0.5, "v3.weight": 0.2}
    return {"a/acc,none": 1.0 - sum((params[k] - t) ** 2 for k, t in target.items())}


def test_swarm_improves_on_the_experts_and_resumes_by_replay():
    evolve = settings("a", sampler="swarm", seed=2, sampler_options={"particles": 6})
    space = swarm_space(expert_space(3, -0.5, 1.5), evolve.sampler_options)
    sampler = make_sampler(evolve, space)
    study = run_study(sampler, space.distributions(), concave, evolve, trials=42)
    experts = [t.value for t in study.trials[:3]]
    assert study.best_value > max(experts) + 0.1
    assert [t.system_attrs[MEMBER_ATTR] for t in study.trials[:7]] == [[0, i] for i in range(6)] + [[1, 0]]

    again = make_sampler(evolve, space)  # a resumed run: a new process, the same study
    again.sync(study)
    sampler.sync(study)  # the last generation finished after the last ask
    assert again._learned == sampler._learned == 7
    assert np.allclose(again.swarm.x, sampler.swarm.x) and np.allclose(again.swarm.v, sampler.swarm.v)


def test_swarm_needs_two_experts():
    evolve = settings("a", sampler="swarm")
    with pytest.raises(SamplerSetupError, match="at least two experts.*has 1"):
        make_sampler(evolve, expert_space(1))


def test_swarm_is_single_objective():
    evolve = settings("a", "b", sampler="swarm", multi_objective=True)
    with pytest.raises(SamplerSetupError, match="optimises one value.*multi_objective"):
        make_sampler(evolve, expert_space(2))
