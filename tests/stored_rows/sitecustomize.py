"""Loaded by a subprocess whose PYTHONPATH names this folder: with STORED_ROWS_LOG set, every per-example
result the process stores is appended to that file as one JSON line [config digest, store key, example id],
so a test sees across processes (an interrupted run and its resume) whether one was computed twice.
Logged after the row is stored: a row computed but never stored (an interrupted trial's) is not logged."""

import json
import os
from collections.abc import Callable


def logging_put(put: Callable, log: str) -> Callable:
    """``ExampleStore.put`` that also logs what it stored to ``log`` (a test in this process patches with it)."""
    def logged(self, digest, rows_by_task):
        put(self, digest, rows_by_task)
        with open(log, "a", encoding="utf-8") as f:
            f.writelines(json.dumps([digest, task, i]) + "\n" for task, rows in rows_by_task.items() for i in rows)

    return logged


if os.environ.get("STORED_ROWS_LOG"):
    from mergekit_evolve.evaluate.example_store import ExampleStore

    ExampleStore.put = logging_put(ExampleStore.put, os.environ["STORED_ROWS_LOG"])
