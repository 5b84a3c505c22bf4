"""Pins what compat/optuna.py relies on in the installed Optuna: an upgrade that moves one fails here."""

import re
import warnings

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from mergekit_evolve.compat import optuna as compat


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def test_storage_trial_id_and_system_attrs(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    trial = study.ask()
    assert compat.storage_of(study).get_trial(compat.trial_id(trial)).number == trial.number
    compat.set_trial_system_attr(study, trial, "k", [1, 2])
    assert study.trials[0].system_attrs["k"] == [1, 2]
    assert isinstance(compat.rdb_storage(study), RDBStorage)
    assert compat.rdb_storage(optuna.create_study()) is None  # in-memory storage: no RDB behind it


def test_heartbeat_enabled_reads_the_storage(tmp_path):
    plain = optuna.create_study(storage=f"sqlite:///{tmp_path / 'a.db'}")
    beating = optuna.create_study(storage=RDBStorage(f"sqlite:///{tmp_path / 'b.db'}", heartbeat_interval=60))
    assert not compat.heartbeat_enabled(plain) and compat.heartbeat_enabled(beating)


def test_journal_heartbeat_fails_a_silent_trial_and_retries_it(tmp_path):
    callback = optuna.storages.RetryFailedTrialCallback(max_retry=1)
    storage = compat.HeartbeatJournalStorage(JournalFileBackend(str(tmp_path / "j.log")), 1, 5, callback)
    study = optuna.create_study(storage=storage)
    assert compat.heartbeat_enabled(study)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage.record_heartbeat(compat.trial_id(trial))
    assert storage._get_stale_trial_ids(study._study_id) == []
    storage.grace = -1  # every beat is now too old
    optuna.storages.fail_stale_trials(study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [TrialState.FAIL, TrialState.WAITING]  # failed, and its point re-queued once


class _InterruptingSampler(optuna.samplers.RandomSampler):
    def before_trial(self, study, trial):  # inside Study.ask, before the objective
        raise KeyboardInterrupt


def test_trials_in_flight_names_a_trial_interrupted_in_the_sampler(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", sampler=_InterruptingSampler())
    with pytest.raises(KeyboardInterrupt) as caught:
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    (running,) = study.get_trials(states=(TrialState.RUNNING,))  # Optuna's clean-up never saw it
    assert compat.trials_in_flight(caught.value) == [compat.trial_id(running)]


def test_trials_in_flight_names_a_trial_interrupted_in_tell(tmp_path, monkeypatch):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compat.storage_of(study), "set_trial_state_values", interrupt)
    with pytest.raises(BaseException) as caught:  # Optuna's finally raises UnboundLocalError over it
        study.optimize(lambda t: 1.0, n_trials=1)
    (running,) = study.get_trials(states=(TrialState.RUNNING,))
    assert compat.trials_in_flight(caught.value) == [compat.trial_id(running)]


def test_the_private_rdb_calls_optuna_makes_exist_and_are_called_from_outside():
    """A storage error in these escaped the reconnecting storage during PostgreSQL restarts (``_get_trials``,
    ``_set_trial_param``, called by the cached storage): exactly the private calls Optuna makes, pinned so an
    Optuna upgrade that adds or renames one fails here."""
    import inspect

    from optuna.storages import RDBStorage, _cached_storage
    from optuna.storages._heartbeat import fail_stale_trials

    from mergekit_evolve.compat.optuna import RDB_PRIVATE_CALLS

    assert all(callable(getattr(RDBStorage, name, None)) for name in RDB_PRIVATE_CALLS)
    called = set(re.findall(r"\._backend\.(_\w+)\(", inspect.getsource(_cached_storage)))
    called |= set(re.findall(r"storage\.(_\w+)\(", inspect.getsource(fail_stale_trials)))
    assert called == set(RDB_PRIVATE_CALLS)
