"""The generation machinery shared by cma, cycleqd and swarm: lost, failed, enqueued and concurrent trials."""

import threading
import time

import optuna
import pytest
from optuna.trial import TrialState
from sampler_harness import expert_space, new_study, settings

from mergekit_evolve.recipe.sampler_options import SwarmOptions
from mergekit_evolve.samplers import generations
from mergekit_evolve.samplers.generations import MEMBER_ATTR
from mergekit_evolve.samplers.registry import make_sampler
from mergekit_evolve.samplers.swarm import swarm_space

SPACE = swarm_space(expert_space(2), SwarmOptions())  # as prepare_recipe widens a swarm's weights
DISTS = SPACE.distributions()


def swarm(storage=None):
    evolve = settings("a", sampler="swarm", sampler_options={"particles": 2})
    sampler = make_sampler(evolve, SPACE)
    return sampler, new_study(sampler, evolve, storage)


def member(study):
    return study.trials[-1].system_attrs.get(MEMBER_ATTR)


def test_a_lost_member_is_handed_out_again_then_counted_as_failed():
    sampler, study = swarm()
    t = study.ask(DISTS)
    assert member(study) == [0, 0]
    study.tell(t, state=TrialState.FAIL)  # Ctrl-C or a dead worker: no error recorded
    retry = study.ask(DISTS)
    assert member(study) == [0, 0] and retry.params == t.params
    study.tell(retry, state=TrialState.FAIL)
    study.tell(study.ask(DISTS), 0.4)  # lost twice: finished, the next member goes out
    assert member(study) == [0, 1]
    study.ask(DISTS)
    assert member(study) == [1, 0] and sampler._learned == 1
    assert sampler.swarm.g_utility == 0.4  # the failed particle taught nothing


def test_a_candidate_that_fails_with_an_error_is_finished_at_once():
    sampler, study = swarm()
    t = study.ask(DISTS)
    t.set_user_attr("error", "RuntimeError: merge failed")
    study.tell(t, state=TrialState.FAIL)
    study.ask(DISTS)
    assert member(study) == [0, 1]


def test_enqueued_points_keep_their_values_and_join_no_generation():
    sampler, study = swarm()
    study.enqueue_trial({"v1.weight": 0.3, "v2.weight": 0.6})
    t = study.ask(DISTS)
    assert t.params == {"v1.weight": 0.3, "v2.weight": 0.6} and member(study) is None
    study.tell(t, 0.9)
    study.ask(DISTS)
    assert member(study) == [0, 0]


def test_with_heartbeats_a_worker_waits_for_the_generation_to_finish(tmp_path, monkeypatch):
    monkeypatch.setattr(generations, "POLL_SECONDS", 0.05)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=60, grace_period=120)
    sampler, study = swarm(storage)
    first, second = study.ask(DISTS), study.ask(DISTS)
    study.tell(first, 0.1)
    # another worker finishes the last member a little later
    finisher = threading.Timer(0.5, lambda: study.tell(second, 0.2))
    finisher.start()
    started = time.perf_counter()
    study.ask(DISTS)
    finisher.join()
    assert time.perf_counter() - started >= 0.4
    assert member(study) == [1, 0] and sampler._learned == 1 and sampler.swarm.g_utility == pytest.approx(0.2)
