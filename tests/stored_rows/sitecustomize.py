"""Loaded by a subprocess whose PYTHONPATH names this folder: with STORED_ROWS_LOG set, every per-example
result the process stores is appended to that file as one JSON line [config digest, store key, example id],
so a test sees across processes (an interrupted run and its resume) whether one was computed twice.
Logged after the row is stored: a row computed but never stored (an interrupted trial's) is not logged."""

import json
import os

if os.environ.get("STORED_ROWS_LOG"):
    from mergekit_evolve.evaluate.example_store import ExampleStore

    put = ExampleStore.put

    def logged(self, digest, rows_by_task):
        put(self, digest, rows_by_task)
        with open(os.environ["STORED_ROWS_LOG"], "a", encoding="utf-8") as f:
            f.writelines(json.dumps([digest, task, i]) + "\n" for task, rows in rows_by_task.items() for i in rows)

    ExampleStore.put = logged
