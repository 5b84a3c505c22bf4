"""Optuna storage for a run: SQLite in the run folder by default, any Optuna URL otherwise."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from mergekit_evolve.compat.optuna import RDB_PRIVATE_CALLS, HeartbeatJournalStorage, rdb_storage
from mergekit_evolve.runfolder import RunFolder, process_gone

LOG = logging.getLogger(__name__)
# A worker that dies mid-trial stops its heartbeat; after the grace period the next ask marks
# that trial failed (and re-queues its point once), so nothing stays RUNNING forever.
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120  # evolve.heartbeat_grace
WORKER_ATTR = "mergekit_evolve:worker:"
WORKER_KEY = "worker"  # trial user attr: "host:pid" of the process that ran it


# Re-queues a lost trial's point once (Optuna 4.9 renamed the class; the old name warns).
RetryLost = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
             or optuna.storages.RetryFailedTrialCallback)


class StorageError(ValueError):
    pass


class StorageLost(RuntimeError):
    """The study's database stayed unreachable for longer than the heartbeat grace period."""


def default_storage_url(run_dir: Path) -> str:
    return f"sqlite:///{RunFolder(run_dir).study_db.resolve()}"


def open_storage(url: str, grace_seconds: int = GRACE_SECONDS) -> optuna.storages.BaseStorage:
    """``sqlite:///``, ``postgresql://``, ``mysql://`` URLs are RDB storages; ``journal:PATH`` a journal file.

    Both get heartbeats (in-memory SQLite excepted): a trial whose worker sent none for
    ``grace_seconds`` is failed, and its point re-queued once, by the next worker that asks
    for a trial.
    """
    interval = max(1, min(HEARTBEAT_SECONDS, grace_seconds // 4))
    if url.startswith("journal:"):
        return HeartbeatJournalStorage(
            JournalFileBackend(url.removeprefix("journal:")), interval, grace_seconds, RetryLost(max_retry=1)
        )
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        # one process's private database: no other worker to watch, and the heartbeat thread's
        # own connection would open an empty database of its own (no tables: it fails each beat)
        return RDBStorage(url)
    sqlite = parsed.get_backend_name() == "sqlite"
    storage = (RDBStorage if sqlite else ReconnectingRDBStorage)(
        url,
        # a server restart or failover leaves every pooled connection dead: test each before use
        engine_kwargs=None if sqlite else {"pool_pre_ping": True},
        heartbeat_interval=interval,
        grace_period=grace_seconds,
        heartbeat_stale_trial_callback=RetryLost(max_retry=1),
    )
    if sqlite:
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # the connection that created the tables predates the listener
    return storage


class ReconnectingRDBStorage(RDBStorage):
    """A database server (PostgreSQL, MySQL) that may restart or fail over during a search.

    Each storage call that cannot reach the server is retried until it can, for up to the
    heartbeat grace period: longer is pointless, since by then other workers fail this
    worker's running trial as lost. Then :class:`StorageLost` stops this worker with one line;
    its finished trials are in the study, and running the same command again resumes.
    A heartbeat that fails is skipped, not fatal (Optuna's heartbeat thread ends at its
    first error, and a trial without heartbeats would be failed while it still runs).
    """

    RETRY_SECONDS = 2.0
    down_since: float | None = None  # monotonic time of the first failed call of the current outage

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
            if not _unreachable(e):
                raise
            LOG.warning("heartbeat of trial id %d not sent, the study storage is unreachable: %s", trial_id, _reason(e))


BLAME_THE_STATEMENT = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.DataError, sqlalchemy.exc.ProgrammingError,
                       sqlalchemy.exc.NotSupportedError)


def lost_storage(error: BaseException) -> StorageLost | None:
    """The :class:`StorageLost` behind ``error``: Optuna's trial clean-up, reading the trial back
    after its ``tell`` failed, fails too and raises an error of its own over ours."""
    while error is not None and not isinstance(error, StorageLost):
        error = error.__cause__ or error.__context__
    return error


def _cause(error: BaseException) -> BaseException:
    return error.__cause__ if isinstance(error, optuna.exceptions.StorageInternalError) and error.__cause__ else error


def _unreachable(error: BaseException) -> bool:
    """A lost connection, as opposed to bad data or a bug: what a server restart gives its clients.

    A fast shutdown ends sessions in the middle of statements; the driver then reports more
    than OperationalError (an aborted transaction, a closed cursor), so everything the server
    or the connection says is retried except the errors that blame the statement itself."""
    cause = _cause(error)
    if isinstance(cause, sqlalchemy.exc.DBAPIError):
        return cause.connection_invalidated or not isinstance(cause, BLAME_THE_STATEMENT)
    return isinstance(cause, sqlalchemy.exc.PendingRollbackError | sqlalchemy.exc.ResourceClosedError)


def _reason(error: BaseException) -> str:
    return (str(_cause(error)).strip().splitlines() or [type(error).__name__])[0]


def _reconnecting(method: Callable[..., Any]) -> Callable[..., Any]:
    def call(self: ReconnectingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        while True:
            try:
                result = method(self, *args, **kwargs)
                self.down_since = None
                return result
            except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as e:
                if not _unreachable(e):
                    raise
                # one outage for every call and thread: once it has lasted the grace period, each call tries once
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    LOG.warning("study storage unreachable (%s); retrying for up to %d s", _reason(e),
                                self.grace_period)
                if time.monotonic() - self.down_since >= self.grace_period:
                    raise StorageLost(
                        f"lost the study storage {self.engine.url.render_as_string(hide_password=True)} for over "
                        f"{self.grace_period} s (evolve.heartbeat_grace): {_reason(e)}; its finished trials are kept, "
                        "run the same command again to resume") from None
                time.sleep(self.RETRY_SECONDS)

    call.__name__ = method.__name__
    return call


# Every storage operation of a search goes through these: the BaseStorage interface, and the private
# methods Optuna's heartbeat and cached storage call directly.
for _name in [n for n in vars(optuna.storages.BaseStorage) if not n.startswith("_")] + list(RDB_PRIVATE_CALLS):
    setattr(ReconnectingRDBStorage, _name, _reconnecting(getattr(RDBStorage, _name)))


def _sqlite_pragmas(connection: sqlite3.Connection, record: Any) -> None:
    """WAL with synchronous=NORMAL: a commit appends to ``study.db-wal`` instead of writing,
    syncing and deleting a rollback journal (a trial commits ~20 times).

    A killed or crashed process loses nothing it committed (the next open reads the WAL), and
    readers and the writer stop blocking each other, which several workers on one machine like.
    An OS crash or power loss can lose the last commits, never corrupt the file. WAL needs
    shared memory: one machine, as SQLite storage already is.
    """
    cursor = connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")  # kept in the file: a no-op once any process set it
    except sqlite3.OperationalError:  # another process held a lock too long: this connection keeps the old mode
        LOG.debug("SQLite journal_mode=WAL not set this time", exc_info=True)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def check_storage(url: str, attempts: int = 3) -> None:
    """Open a storage URL given by the user once, so a typo or an unreachable server stops the run before it starts.

    Tried a few times: processes started together on an empty database race to create
    Optuna's tables, and the loser sees a duplicate-key error once.
    """
    for attempt in range(attempts):
        try:
            open_storage(url).get_all_studies()
            return
        except ImportError as e:
            raise StorageError(f"cannot open the study storage '{url}': {e} "
                               "(PostgreSQL: pip install 'psycopg[binary]'; "
                               "MySQL: pip install PyMySQL)") from None
        except Exception as e:  # sqlalchemy, OSError: all mean "cannot use this URL"
            if attempt == attempts - 1:
                raise StorageError(f"cannot open the study storage '{url}': {type(e).__name__}: {e}") from None
            time.sleep(1.0)


def close_storage(study: optuna.Study) -> None:
    """Close an RDB storage's pooled connections: with the last one closed, SQLite folds the WAL
    into study.db and removes study.db-wal/-shm, so the file alone is the whole study (for a
    copy or a push). Connections open again on the next use."""
    backend = rdb_storage(study)
    if backend is not None:
        backend.engine.dispose()


def register_worker(study: optuna.Study) -> int:
    """Join ``study`` as one more worker; returns this worker's index (0 for the first ever).

    Optuna's samplers propose the same points in every process that uses the same seed
    (optuna#4714), so each worker offsets its sampler seed by this index. A key sorts by the
    time it was written; taking at least the count seen before writing keeps two workers from
    sharing an index even when a host's clock lags.
    """
    before = sum(k.startswith(WORKER_ATTR) for k in study.user_attrs)
    key = f"{WORKER_ATTR}{time.time_ns():020d}:{uuid.uuid4().hex[:8]}"
    study.set_user_attr(key, {"host": socket.gethostname(), "pid": os.getpid()})
    keys = sorted(k for k in study.user_attrs if k.startswith(WORKER_ATTR))
    return max(before, keys.index(key))


def reap(study: optuna.Study, name: str, why: str, quiet: bool = False) -> list[int]:
    """Fail the running trials of the dead worker ``name`` and re-queue each point once.

    ``why`` ends "worker NAME ..." in the warning; ``quiet`` logs nothing (a stop we asked for)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    lost = requeue(study, [t for t in running if t.user_attrs.get(WORKER_KEY) == name])
    if not quiet:
        requeued = f"; its trial {', '.join(map(str, lost))} failed and was re-queued" if lost else ""
        LOG.warning("worker %s %s%s", name, why, requeued)
    return lost


def requeue(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> list[int]:
    """Fail ``trials`` and re-queue each one's point once; returns their numbers."""
    retry = RetryLost(max_retry=1)
    for trial in trials:
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        retry(study, trial)  # uses only its point and attrs
    return [t.number for t in trials]


def fail_orphans(study: optuna.Study, grace_seconds: int = GRACE_SECONDS) -> list[int]:
    """Fail (and re-queue once) the running trials of this host's processes that have ended (a kill -9,
    a crash): at once, on resume, rather than after the heartbeat grace period.

    Also a running trial that no worker named for twice the grace period: its process lost the
    storage right after creating it (so it sent no heartbeat either, and Optuna never finds it
    stale), and a process that cannot reach the storage for the grace period stops. Twice, so a
    host whose clock runs ahead of the trial's creator cannot fail a trial that is being named."""
    lost = []
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for name in sorted({t.user_attrs[WORKER_KEY] for t in running if t.user_attrs.get(WORKER_KEY)}):
        host, _, pid = name.rpartition(":")
        if host and pid.isdigit() and process_gone(host, int(pid)):
            lost += reap(study, name, "ended without finishing")
    now = datetime.datetime.now()
    unnamed = [t for t in running if not t.user_attrs.get(WORKER_KEY) and t.datetime_start is not None
               and (now - t.datetime_start).total_seconds() > 2 * grace_seconds]
    if unnamed:
        lost += requeue(study, unnamed)
        LOG.warning("trial %s: no worker named it within %d s (its process lost the study storage right after "
                    "creating it); failed and re-queued", ", ".join(str(t.number) for t in unnamed), 2 * grace_seconds)
    return lost


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def tagged(objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
    """The objective, marking each trial with the process that runs it (so a dead one's trial can be found)."""
    name = worker_name()

    def run(trial: optuna.Trial) -> Any:
        trial.set_user_attr(WORKER_KEY, name)
        return objective(trial)

    return run
