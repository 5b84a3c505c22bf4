"""CycleQD: binning, archive insertion, elite sampling, crossover, mutation and the final merge, against
hand computations from the paper's formulas; the sampler on a study; its run-folder file and resume."""

import json
import math

import numpy as np
import pytest
import torch
from mergekit.merge_methods import TensorGroup, get
from sampler_harness import expert_space, run_study, settings

from mergekit_evolve.methods.common import tensor_generator
from mergekit_evolve.methods.registry import register_plugins
from mergekit_evolve.recipe.search_space import Dimension
from mergekit_evolve.runfolder import RunFolder
from mergekit_evolve.samplers.archive import Archive, Elite, bin_index, elite_probabilities
from mergekit_evolve.samplers.cycleqd import combine, crossover, experts_bounds
from mergekit_evolve.samplers.generations import MEMBER_ATTR, Outcome
from mergekit_evolve.samplers.registry import SamplerSetupError, make_sampler

MUTATION = (Dimension("mutation.seed", "int", low=0, high=2**31 - 1),
            Dimension("mutation.w_max", "float", low=0.0, high=2.0))


def test_bins_are_fifteen_equal_bins_between_the_bounds():
    assert [bin_index(s, 0.0, 1.0, 15) for s in (0.0, 0.5, 0.999, 1.0)] == [0, 7, 14, 14]
    assert bin_index(1 / 15 + 1e-9, 0.0, 1.0, 15) == 1 and bin_index(1 / 15 - 1e-9, 0.0, 1.0, 15) == 0
    assert bin_index(-0.3, 0.0, 1.0, 15) == 0 and bin_index(7.0, 0.0, 1.0, 15) == 14  # outside: the end bins
    assert bin_index(35.0, 20.0, 50.0, 3) == 1


def elite(trial, **q):
    return Elite(trial, (1.0, 0.0), None, q)


def test_archive_cell_is_the_other_tasks_bins_and_insertion_keeps_the_better():
    bounds = {t: (0.0, 1.0) for t in "abc"}
    archive = Archive("a", ["b", "c"], 15, bounds)
    first = elite(0, a=0.5, b=0.1, c=0.95)
    assert archive.cell_of(first.qualities) == (1, 14)
    assert archive.offer(first)
    assert not archive.offer(elite(1, a=0.4, b=0.12, c=0.99))  # same cell, worse quality
    assert not archive.offer(elite(2, a=0.5, b=0.13, c=0.96))  # same cell, no better
    assert archive.offer(elite(3, a=0.6, b=0.10, c=0.94))  # same cell, better: replaces
    assert archive.offer(elite(4, a=0.1, b=0.9, c=0.0))  # an empty cell takes anything
    assert [e.trial for e in archive.elites()] == [3, 4]
    assert archive.best().trial == 3


def test_elite_sampling_probabilities_by_hand():
    elites = [elite(0, a=0.2, b=0.9), elite(1, a=0.6, b=0.5), elite(2, a=1.0, b=0.1)]
    # normalised a: 0, .5, 1; b: 1, .5, 0 -> weights .5*.8=.4, .65*.65=.4225, .8*.5=.4
    assert elite_probabilities(elites, ["a", "b"]) == pytest.approx(np.array([0.4, 0.4225, 0.4]) / 1.2225)
    same = [elite(0, a=0.3, b=0.3), elite(1, a=0.3, b=0.3)]
    assert elite_probabilities(same, ["a", "b"]) == pytest.approx([0.5, 0.5])


def test_crossover_is_the_weighted_mean_of_the_parents():
    assert crossover(np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), 0.8, 1.2) == pytest.approx([0.4, 0.6, 0.0])
    assert crossover(np.array([0.2, 0.4]), np.array([0.6, 0.0]), 1.0, 1.0) == pytest.approx([0.4, 0.2])


def _sampler(tasks=("a", "b"), seed=1, n=3, **options):
    evolve = settings(*tasks, sampler="cycleqd", seed=seed, sampler_options=options)
    space = expert_space(n, extra=MUTATION if options.get("mutation", "svd") != "none" else ())
    return make_sampler(evolve, space), space, evolve


def q(**scores):
    return {f"{task}/acc,none": value for task, value in scores.items()}


def test_child_draws_parents_weights_and_mutation_as_documented():
    sampler, _, _ = _sampler(crossover_mu=1.0, crossover_sigma=0.3)
    archive = sampler.archives[0]
    for e in [Elite(0, (1.0, 0.0, 0.0), None, q(a=0.2, b=0.9)), Elite(1, (0.0, 1.0, 0.0), None, q(a=0.6, b=0.5)),
              Elite(2, (0.0, 0.0, 1.0), None, q(a=1.0, b=0.1))]:
        archive.cells[archive.cell_of(e.qualities)] = e
    coefficients, mutation, mix = sampler.child(archive, np.random.default_rng(9))
    rng = np.random.default_rng(9)
    elites = archive.elites()
    assert len(elites) == 3
    i, j = rng.choice(3, size=2, replace=False, p=elite_probabilities(elites, list(q(a=0, b=0))))
    w1, w2 = rng.normal(1.0, 0.3, size=2)
    c1, c2 = np.array(elites[i].coefficients), np.array(elites[j].coefficients)
    assert coefficients == pytest.approx(np.clip((w1 * c1 + w2 * c2) / (w1 + w2), 0.0, 1.0))
    assert mutation == (int(rng.integers(0, 2**31 - 1)), 2.0) and mix == ()

    uniform, _, _ = _sampler(elite_sampling=False)
    uniform.archives[0].cells = dict(archive.cells)
    coefficients, _, _ = uniform.child(uniform.archives[0], np.random.default_rng(9))
    rng = np.random.default_rng(9)
    i, j = rng.choice(3, size=2, replace=False, p=None)
    w1, w2 = rng.normal(1.0, 0.3, size=2)
    c1, c2 = np.array(elites[i].coefficients), np.array(elites[j].coefficients)
    assert coefficients == pytest.approx(np.clip((w1 * c1 + w2 * c2) / (w1 + w2), 0.0, 1.0))


def test_a_child_inherits_its_mutated_parents_whole_and_folds_in_unmutated_ones():
    # parent 7 was mutated: the child carries all of tau_7 (the mutation included), at a1;
    # parent 9 was not, but inherits 7 itself: tau_9 = 0.5 e1 + 0.2 e3 + 0.4 tau_7, folded in at a2
    mutated = Elite(7, (0.6, 0.4, 0.0), (123, 2.0), q(a=0.9, b=0.2))
    plain = Elite(9, (0.5, 0.0, 0.2), None, q(a=0.3, b=0.8), mix=((7, 0.4),))
    coefficients, mix = combine([(mutated, 0.3), (plain, 0.7)], 3)
    assert coefficients == pytest.approx([0.35, 0.0, 0.14])  # 0.7 x (0.5, 0, 0.2): 7's own weights are not copied
    assert dict(mix) == pytest.approx({7: 0.3 + 0.7 * 0.4})
    # the old sampler crossed over coefficients only: 0.3 x (0.6, 0.4, 0) + 0.7 x (0.5, 0, 0.2), mutation lost
    assert not np.allclose(coefficients, [0.53, 0.12, 0.14])

    sampler, _, _ = _sampler(crossover_sigma=0.0)  # w1 = w2 = 1: a1 = a2 = 1/2
    archive = sampler.archives[0]
    for e in (mutated, plain):
        archive.cells[archive.cell_of(e.qualities)] = e
    coefficients, mutation, mix = sampler.child(archive, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    i, j = rng.choice(2, size=2, replace=False, p=elite_probabilities(archive.elites(), list(q(a=0, b=0))))
    expected = combine([(archive.elites()[int(i)], 0.5), (archive.elites()[int(j)], 0.5)], 3)
    assert coefficients == pytest.approx(expected[0]) and dict(mix) == pytest.approx(dict(expected[1]))
    assert dict(mix)[7] == pytest.approx(0.5 + 0.5 * 0.4) and mutation[1] == 2.0


def test_the_final_merge_carries_the_elites_mutations():
    sampler, _, _ = _sampler(tasks=("a", "b"))
    a, b = sampler.archives
    a.offer(Elite(4, (0.7, 0.3, 0.0), (55, 2.0), q(a=0.8, b=0.1)))
    b.offer(Elite(5, (0.0, 1.0, 0.0), None, q(a=0.1, b=0.6)))
    beta = np.exp([0.8, 0.6]) / np.exp([0.8, 0.6]).sum()
    coefficients, mix = sampler.merged_elites()
    assert coefficients == pytest.approx([0.0, beta[1], 0.0]) and dict(mix) == pytest.approx({4: beta[0]})


def test_lineage_rebuilds_each_ancestor_as_its_own_merge_computed_it():
    register_plugins()
    g = group()
    base, x, _ = g.tensors
    # the ancestor: trial 3, 0.6 x + 0.4 y, SVD-mutated with seed 7
    (parent,) = get("svd_mutation")([g], parameters={"weight": {"x": 0.6, "y": 0.4}, "seed": 7, "w_max": 2.0})
    # its child: 0.5 tau_3 + 0.5 (0.2 x), mutated with seed 8
    lineage = json.dumps({"mix": [["t3", 0.5]],
                          "nodes": {"t3": {"weights": {"x": 0.6, "y": 0.4}, "mix": [], "mutation": [7, 2.0]}}})
    params = {"weight": {"x": 0.1, "y": 0.0}, "seed": 8, "w_max": 2.0, "lineage": lineage}
    (child,) = get("svd_mutation")([g], parameters=params)
    delta = 0.1 * (x - base) + 0.5 * (parent - base)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    w = torch.rand(4, generator=tensor_generator(8, g.metadata.name)) * 2.0
    assert torch.allclose(child, base + u @ torch.diag(s * w) @ vh, atol=1e-5)
    # without the lineage the child would lack its parent's mutation entirely
    (orphan,) = get("svd_mutation")([g], parameters={**params, "lineage": ""})
    assert not torch.allclose(orphan, child, atol=1e-3)


def test_svd_mutation_between_w_min_and_w_max_is_the_released_codes_form():
    register_plugins()
    g = group()
    base, x, _ = g.tensors
    (out,) = get("svd_mutation")([g], parameters={"weight": {"x": 1.0, "y": 0.0}, "seed": 2, "w_max": 1.1,
                                                  "w_min": 1.0})
    u, s, vh = torch.linalg.svd(x - base, full_matrices=False)
    w = 1.0 + torch.rand(4, generator=tensor_generator(2, g.metadata.name)) * 0.1
    # released code: child += U diag(0.1 U[0, 1] S) V^T on the expert's own SVD
    assert torch.allclose(out, base + u @ torch.diag(s * w) @ vh, atol=1e-6)


def test_paper_preset_and_bins_from_the_experts():
    options = settings("a", "b", sampler="cycleqd", sampler_options={"preset": "paper"}).sampler_options
    assert (options.children, options.crossover_mu, options.crossover_sigma) == (1, 1.0, 0.01)
    assert ((options.w_min, options.w_max, options.elite_slope, options.bounds_from_experts)
            == (1.0, 1.1, 0.8, (0.85, 1.15)))
    default = settings("a", "b", sampler="cycleqd").sampler_options
    assert ((default.children, default.crossover_sigma, default.w_max, default.bounds_from_experts)
            == (4, 0.3, 2.0, None))
    bounds = experts_bounds([q(a=0.2, b=0.5), q(a=0.4, b=0.1)], (0.85, 1.15))
    assert bounds["a/acc,none"] == pytest.approx((0.17, 0.46)) and bounds["b/acc,none"] == pytest.approx((0.085, 0.575))
    sampler, _, _ = _sampler(preset="paper")
    sampler._plan(0)
    sampler._learn(0, [Outcome(i, sampler._plan_of(0)[i], 0.0, qs)
                       for i, qs in enumerate([q(a=0.2, b=0.5), q(a=0.4, b=0.1), q(a=0.3, b=0.3)])])
    assert sampler.archives[0].bounds["b/acc,none"] == pytest.approx((0.085, 0.575))


def test_quality_task_cycles_and_the_merged_elites_close_each_cycle():
    sampler, _, _ = _sampler(tasks=("a", "b", "c"), children=2)
    assert [sampler.quality_task(g) for g in range(1, 8)] == [0, 1, 2, 0, 1, 2, 0]
    a, b, c = sampler.archives
    a.offer(Elite(0, (1.0, 0.0, 0.0), None, q(a=0.8, b=0.1, c=0.1)))
    b.offer(Elite(1, (0.0, 1.0, 0.0), None, q(a=0.1, b=0.6, c=0.1)))
    beta = np.exp([0.8, 0.6]) / np.exp([0.8, 0.6]).sum()  # archive c is empty
    coefficients, mix = sampler.merged_elites()
    assert coefficients == pytest.approx([beta[0], beta[1], 0.0]) and mix == ()
    plans = [sampler._plan(g) for g in (1, 2, 3)]
    assert [len(p) for p in plans] == [2, 2, 3]  # + the merged elites after task c's generation
    merged = plans[2][-1]
    assert merged["mutation.w_max"] == 0.0 and merged["v1.weight"] == pytest.approx(beta[0])


def group(name="model.layers.0.mlp.down_proj.weight", shape=(6, 4)):
    torch.manual_seed(0)
    base = torch.randn(shape)
    return TensorGroup.from_tensors([base, base + 0.1 * torch.randn(shape), base + 0.1 * torch.randn(shape)],
                                    ids=["base", "x", "y"], base_index=0, name=name)


def test_svd_mutation_is_u_diag_s_times_w_v_transposed():
    register_plugins()
    g = group()
    base, x, y = g.tensors
    (out,) = get("svd_mutation")([g], parameters={"weight": {"x": 0.3, "y": 0.9}, "seed": 5, "w_max": 2.0})
    delta = 0.3 * (x - base) + 0.9 * (y - base)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    w = torch.rand(4, generator=tensor_generator(5, g.metadata.name)) * 2.0
    assert torch.all((0 <= w) & (w <= 2.0))
    assert torch.allclose(out, base + u @ torch.diag(s * w) @ vh, atol=1e-6)
    assert torch.allclose(torch.linalg.svdvals(out - base), torch.sort(s * w, descending=True).values, atol=1e-5)
    (again,) = get("svd_mutation")([g], parameters={"weight": {"x": 0.3, "y": 0.9}, "seed": 5, "w_max": 2.0})
    (other,) = get("svd_mutation")([g], parameters={"weight": {"x": 0.3, "y": 0.9}, "seed": 6, "w_max": 2.0})
    assert torch.equal(out, again) and not torch.allclose(out, other)


def test_no_mutation_and_vectors_merge_exactly_as_task_arithmetic():
    register_plugins()
    weights = {"weight": {"x": 0.3, "y": 0.9}}
    for g, params in [(group(), {"seed": 5, "w_max": 0.0}),
                      (group("model.norm.weight", (6,)), {"seed": 5, "w_max": 2.0})]:
        (mutated,) = get("svd_mutation")([g], parameters={**weights, **params})
        (plain,) = get("task_arithmetic")([g], parameters=weights)
        assert torch.equal(mutated, plain)


def test_gaussian_mutation_adds_scaled_seeded_noise():
    register_plugins()
    g = group()
    base, x, y = g.tensors
    (out,) = get("gaussian_mutation")([g], parameters={"weight": {"x": 1.0, "y": 0.5}, "seed": 3, "noise": 0.1})
    delta = (x - base) + 0.5 * (y - base)
    noise = torch.randn((6, 4), generator=tensor_generator(3, g.metadata.name))
    assert torch.allclose(out, base + delta + 0.1 * delta.std() * noise, atol=1e-6)


def two_skills(params):
    w = [params[f"v{i}.weight"] for i in (1, 2, 3)]
    return {"a/acc,none": 1 - (w[0] - 0.9) ** 2 - (w[1] - 0.4) ** 2 - w[2] ** 2,
            "b/acc,none": 1 - (w[0] - 0.1) ** 2 - (w[1] - 0.5) ** 2 - (w[2] - 0.8) ** 2}


def test_cycleqd_on_a_study_fills_archives_writes_them_and_resumes(tmp_path):
    sampler, space, evolve = _sampler(children=3, seed=4)
    study = run_study(sampler, space.distributions(), two_skills, evolve, trials=3 + 4 * 3 + 2)
    trials = study.trials
    assert [t.system_attrs[MEMBER_ATTR] for t in trials[:4]] == [[0, 0], [0, 1], [0, 2], [1, 0]]
    for j, t in enumerate(trials[:3]):  # generation 0: the experts, unmutated
        assert [t.params[f"v{i}.weight"] for i in (1, 2, 3)] == [float(i == j + 1) for i in (1, 2, 3)]
        assert t.params["mutation.w_max"] == 0.0
    children = [t for t in trials[3:] if t.params["mutation.w_max"] > 0]
    assert len(children) >= 10 and len({t.params["mutation.seed"] for t in children}) == len(children)
    # generations 1 (task a) and 2 (task b) make a cycle; 2 and 4 end with the merged elites
    merged = [t for t in trials if t.system_attrs[MEMBER_ATTR] in ([2, 3], [4, 3])]
    assert len(merged) == 2 and all(t.params["mutation.w_max"] == 0.0 for t in merged)

    sampler.write_run_files(tmp_path, study)
    data = json.loads(RunFolder(tmp_path).archives.read_text())
    assert data["generations"] == 5 and data["merged_elites_trials"] == [t.number for t in merged]
    assert [a["task"] for a in data["archives"]] == ["a/acc,none", "b/acc,none"]
    best_a = max(t.user_attrs["scores"]["a/acc,none"] for t in trials)
    assert max(c["qualities"]["a/acc,none"] for c in data["archives"][0]["cells"]) == best_a
    for archive in data["archives"]:  # each cell holds the best of the trials that fall in it
        for cell in archive["cells"]:
            assert cell["cell"] == [min(14, max(0, math.floor(cell["qualities"][d] * 15)))
                                    for d in archive["descriptors"]]

    again, _, _ = _sampler(children=3, seed=4)  # a resumed run replays the study to the same archives
    again.write_run_files(tmp_path, study)
    assert json.loads(RunFolder(tmp_path).archives.read_text()) == data


def test_cycleqd_needs_two_tasks():
    evolve = settings("a", sampler="cycleqd")
    with pytest.raises(SamplerSetupError, match="at least two objectives.*has 1 .a/acc,none"):
        make_sampler(evolve, expert_space(3, extra=MUTATION))


def test_cycleqd_searches_only_expert_weights_from_the_experts():
    evolve = settings("a", "b", sampler="cycleqd", sampler_options={"mutation": "none"})
    space = expert_space(2)
    space.dimensions["density"] = Dimension("density", "float", low=0.1, high=1.0)
    with pytest.raises(SamplerSetupError, match=r"moves only the experts' weights.*\['density'\]"):
        make_sampler(evolve, space)
    with pytest.raises(SamplerSetupError, match=r"searches \[0.2, 1.0\]; widen it to include \[0, 1\]"):
        make_sampler(evolve, expert_space(2, low=0.2))
