"""Optuna storage for a run: SQLite in the run folder by default, any Optuna URL otherwise."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryFailedTrialCallback
from optuna.storages.journal import JournalFileBackend

# A worker that dies mid-trial stops its heartbeat; after the grace period the next ask marks
# that trial failed (and re-queues its point once), so nothing stays RUNNING forever.
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120


def default_storage_url(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """``sqlite:///``, ``postgresql://``, ``mysql://`` URLs are RDB storages; ``journal:PATH`` a journal file."""
    if url.startswith("journal:"):
        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return RDBStorage(
        url,
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=GRACE_SECONDS,
        heartbeat_stale_trial_callback=RetryFailedTrialCallback(max_retry=1),
    )
