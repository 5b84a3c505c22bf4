"""The run folder's SQLite study (study.db): WAL with synchronous=NORMAL, safe when a process is
killed, shared by several processes on one machine, readable by plain Optuna (optuna-dashboard)."""

import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from mergekit_evolve.study.storage import default_storage_url, open_storage

# runs n trials on the study "s" at URL, then ends (argv[3] == "kill": killed, nothing closed)
TRIALS = """
import os, signal, sys
import optuna
from mergekit_evolve.study.storage import open_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(study_name="s", storage=open_storage(sys.argv[1]), load_if_exists=True)
study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=int(sys.argv[2]))
if sys.argv[3] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def run_trials(url: str, n: int, end: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TRIALS, url, str(n), end])


def test_default_storage_writes_ahead_without_waiting_for_the_disk(tmp_path):
    storage = open_storage(default_storage_url(tmp_path))
    with storage.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # the heartbeat thread's
def test_in_memory_sqlite_is_left_as_it_is():
    study = optuna.create_study(storage=open_storage("sqlite://"))  # reopening its connection would lose the tables
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2


def test_a_killed_process_keeps_every_finished_trial(tmp_path):
    url = default_storage_url(tmp_path)
    assert run_trials(url, 12, "kill").wait(timeout=120) == -signal.SIGKILL
    assert (tmp_path / "study.db-wal").stat().st_size > 0  # the trials are still in the log, not checkpointed
    resumed = optuna.load_study(study_name="s", storage=open_storage(url))
    assert [t.state for t in resumed.trials] == [TrialState.COMPLETE] * 12
    plain = optuna.load_study(study_name="s", storage=url)  # as optuna-dashboard opens it
    assert [t.params for t in plain.trials] == [t.params for t in resumed.trials]


def test_processes_on_one_machine_share_study_db(tmp_path):
    url = default_storage_url(tmp_path)
    optuna.create_study(study_name="s", storage=open_storage(url))
    procs = [run_trials(url, 20, "exit") for _ in range(3)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0, 0]
    trials = optuna.load_study(study_name="s", storage=open_storage(url)).trials
    assert sorted(t.number for t in trials) == list(range(60))
    assert all(t.state == TrialState.COMPLETE for t in trials)


def test_orphans_are_found_beside_a_running_trial_that_has_no_worker_name_yet(tmp_path):
    """A process that lost the storage right after creating its trial leaves it RUNNING unnamed."""
    from mergekit_evolve.study.storage import WORKER_KEY, fail_orphans

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    study.ask()
    named = study.ask()
    named.set_user_attr(WORKER_KEY, "another-host:1")  # another host's process: never reaped from here
    assert fail_orphans(study) == []
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.RUNNING]


def test_a_trial_no_worker_named_within_twice_the_grace_is_failed_and_requeued(tmp_path):
    """Its process lost the storage before naming it or sending a heartbeat: Optuna never finds it stale."""
    from mergekit_evolve.study.storage import WORKER_KEY, fail_orphans

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    unnamed = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    named = study.ask()
    named.set_user_attr(WORKER_KEY, "another-host:1")
    time.sleep(0.01)
    assert fail_orphans(study, grace_seconds=0) == [unnamed.number]
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert study.trials[2].params == {"x": unnamed.params["x"]}  # its point is tried again


def test_an_interrupt_naming_a_trial_the_storage_never_stored_fails_nothing(tmp_path, monkeypatch):
    """Ctrl-C inside ``create_new_trial``: the id its frames hold was rolled back."""
    from mergekit_evolve.study import search

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    running = study.ask()
    monkeypatch.setattr(search, "trials_in_flight", lambda error: [running._trial_id, 999])
    search._fail_in_flight(study, KeyboardInterrupt())
    assert [t.state for t in study.trials] == [TrialState.FAIL]
