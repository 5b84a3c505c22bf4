"""A real PostgreSQL study, as the README's several-hosts setup uses one: a throwaway server
(tests/pg_cluster.py) restarted, stopped and shared by two mergekit-evolve processes, each with
its own run folder, one of them killed in the middle of a trial.

Without the server binaries the tests skip, except in CI (CI=true), where they fail:
.ci/postgres-deps.sh installs them there.
"""

import json
import logging
import os
import signal
import threading
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from mergekit_evolve.study.storage import WORKER_KEY, StorageLost, open_storage
from pg_cluster import ClusterUnavailable, PostgresCluster
from test_multi_host import start
from test_parallel import wait_for, write_recipe
from tiny_models import write_copy_task

TRIALS = 60


def unavailable(reason: str):
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"{reason} (CI must run the PostgreSQL tests: .ci/run installs the server)")
    pytest.skip(reason)


@pytest.fixture
def postgres():
    try:
        import psycopg  # noqa: F401  SQLAlchemy's driver for postgresql:// URLs
    except ImportError:
        unavailable("no PostgreSQL driver: pip install 'psycopg[binary]' (in the test extra)")
    try:
        cluster = PostgresCluster()
    except ClusterUnavailable as e:
        unavailable(str(e))
    yield cluster
    cluster.remove()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("postgres")
    write_copy_task(root, n_search=96)
    return root


def objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0, 1)


# --- the storage against a server that restarts or goes away ------------------------------


def test_a_server_restart_between_trials_is_invisible(postgres):
    study = optuna.create_study(study_name="s", storage=open_storage(postgres.url, grace_seconds=30))
    study.optimize(objective, n_trials=3)
    postgres.restart()  # every pooled connection is now dead
    study.optimize(objective, n_trials=3)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6


def test_an_outage_shorter_than_the_grace_period_is_waited_out(postgres):
    storage = open_storage(postgres.url, grace_seconds=60)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    postgres.stop()
    storage.record_heartbeat(trial._trial_id)  # skipped with a warning: the heartbeat thread must not die
    restarted = threading.Event()
    threading.Timer(3.0, lambda: (postgres.start(), restarted.set())).start()
    study.tell(trial, 0.5)  # retried until the server is back
    assert restarted.is_set() and study.trials[0].state == TrialState.COMPLETE


def test_an_outage_longer_than_the_grace_period_stops_with_one_line(postgres, caplog):
    storage = open_storage(postgres.url, grace_seconds=2)
    study = optuna.create_study(study_name="s", storage=storage)
    study.optimize(objective, n_trials=2)
    postgres.stop()
    with caplog.at_level(logging.WARNING), pytest.raises(StorageLost) as lost:
        study.optimize(objective, n_trials=2)
    message = str(lost.value)
    assert "\n" not in message and f"127.0.0.1:{postgres.port}/evolve for over 2 s" in message
    assert "run the same command again to resume" in message
    assert "study storage unreachable" in caplog.text
    postgres.start()  # a restart resumes: the finished trials are there
    again = optuna.load_study(study_name="s", storage=open_storage(postgres.url, grace_seconds=2))
    assert [t.state for t in again.trials][:2] == [TrialState.COMPLETE] * 2
