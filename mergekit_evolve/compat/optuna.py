"""Optuna's private surface this package relies on (tested against the installed version in tests/compat/)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.storages.journal import BaseJournalBackend
from optuna.study import _optimize
from optuna.trial import FrozenTrial, TrialState

HEARTBEAT_ATTR = "mergekit_evolve:heartbeat"


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage a Study object talks to (Optuna keeps it private)."""
    return study._storage


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (not its number)."""
    return trial._trial_id


def heartbeat_enabled(study: optuna.Study) -> bool:
    return is_heartbeat_enabled(study._storage)


def set_trial_system_attr(study: optuna.Study, trial: optuna.Trial | FrozenTrial, key: str, value: object) -> None:
    """A system attr on a running trial (Optuna's public ``Trial`` deprecated ``set_system_attr``)."""
    study._storage.set_trial_system_attr(trial._trial_id, key, value)


def rdb_storage(study: optuna.Study) -> RDBStorage | None:
    """The RDB storage behind a study, unwrapped from Optuna's cache layer; None for other storages."""
    backend = getattr(study._storage, "_backend", study._storage)
    return backend if isinstance(backend, RDBStorage) else None


def trials_in_flight(error: BaseException) -> list[int]:
    """Ids of the trials that ``error`` unwound Optuna's trial loop out of, read from its frames.

    An interrupt that lands outside the objective (in the sampler inside ``Study.ask``, or in the
    ``tell`` after it) escapes Optuna's own clean-up and leaves the trial RUNNING; the frames of
    ``_run_trial`` and ``Study.ask`` are the only place that knows which trial it was."""
    found: list[int] = []
    for frame in _frames(error):
        if frame.f_code is _optimize._run_trial.__code__ and "trial" in frame.f_locals:
            found.append(frame.f_locals["trial"]._trial_id)
        elif frame.f_code is optuna.Study.ask.__code__ and "trial_id" in frame.f_locals:
            found.append(frame.f_locals["trial_id"])
    return list(dict.fromkeys(found))


def _frames(error: BaseException | None) -> Iterator:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # the error and those it was raised over
        seen.add(id(error))
        tb = error.__traceback__
        while tb is not None:
            yield tb.tb_frame
            tb = tb.tb_next
        error = error.__cause__ or error.__context__


# RDBStorage's private methods that Optuna calls from outside its storage interface: the heartbeat
# (stale trials) and the cached storage wrapping every RDB storage (creating and reading trials,
# setting a parameter). A wrapper of
# every storage call (study/storage.py's reconnecting storage) wraps these too.
RDB_PRIVATE_CALLS = ("_create_new_trial", "_get_best_trial_id", "_get_stale_trial_ids", "_get_trials",
                     "_set_trial_param")


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal file with Optuna's heartbeat protocol (Optuna implements it for RDB storages only).

    A heartbeat is the trial's system attr ``[trial_id, unix time]``; the id matters because a
    retried trial inherits the system attrs of the trial it retries. Hosts sharing a journal
    file on a network file system need roughly synchronised clocks (well within the grace period).
    """

    def __init__(self, backend: BaseJournalBackend, interval: int, grace: int,
                 callback: Callable[[optuna.Study, FrozenTrial], None]):
        super().__init__(backend)
        self.interval, self.grace, self.callback = interval, grace, callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, [trial_id, time.time()])

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        # like RDBStorage: a trial that never sent a heartbeat is not stale
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_ATTR)
            if beat and beat[0] == trial._trial_id and now - beat[1] > self.grace:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int:
        return self.interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None]:
        return self.callback
