"""``trials.jsonl``: one line a trial, exported from the study (the study is the source of truth)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from mergekit_evolve.runfolder import RunFolder


def trial_record(trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    seconds = dict(attrs.get("seconds", {}))
    if trial.datetime_start and trial.datetime_complete:
        total = (trial.datetime_complete - trial.datetime_start).total_seconds()
        seconds["total"] = round(total, 4)
        seconds["other"] = round(max(0.0, total - seconds.get("merge", 0.0) - seconds.get("evaluate", 0.0)), 4)
    return {
        "number": trial.number,
        "state": trial.state.name,
        # one value, or one per objective in a multi-objective study
        "value": ((trial.values[0] if len(trial.values) == 1 else trial.values)
                  if trial.state == optuna.trial.TrialState.COMPLETE else None),
        "scores": attrs.get("scores"),
        "point": trial.params,
        "config": attrs.get("config"),
        "config_digest": attrs.get("config_digest"),
        "reused_from": attrs.get("reused_from"),
        "seconds": seconds,
        "error": attrs.get("error"),
        "unparsed": attrs.get("unparsed"),  # a parsed judge's unreadable replies, of how many
        "worker": attrs.get("worker"),
        "started": trial.datetime_start.isoformat() if trial.datetime_start else None,
    }


def append_record(run_dir: Path, trial: FrozenTrial) -> None:
    with open(RunFolder(run_dir).trials, "a", encoding="utf-8") as fp:
        fp.write(json.dumps(trial_record(trial)) + "\n")


def export_records(run_dir: Path, study: optuna.Study) -> None:
    """Rewrite the file from the study, so a resumed run holds each trial exactly once."""
    path = RunFolder(run_dir).trials
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fp:
        for trial in study.get_trials(deepcopy=False):
            if trial.state.is_finished():
                fp.write(json.dumps(trial_record(trial)) + "\n")
    tmp.replace(path)
