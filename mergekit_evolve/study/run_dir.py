"""The run folder: created once, resumed by the same recipe, never overwritten unless asked."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from mergekit_evolve.recipe.load import Recipe

RUN_FILE = "run.json"
# Settings that may change between a run and its resume without changing what is searched.
RESUMABLE = {"trials", "device", "batch_size", "max_failures", "workers", "heartbeat_grace", "threads"}


class RunDirError(RuntimeError):
    pass


def fingerprint(recipe: Recipe) -> str:
    evolve = recipe.evolve.model_dump(mode="json", exclude=RESUMABLE) if recipe.evolve else None
    blob = json.dumps({"config": recipe.template, "evolve": evolve}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_run_dir(run_dir: Path, recipe: Recipe, overwrite: bool = False) -> None:
    """Refuse, without writing anything, a folder that holds something other than this recipe's run."""
    marker = run_dir / RUN_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a folder")
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        if not marker.exists():
            raise RunDirError(f"{run_dir} exists and is not a mergekit-evolve run folder; choose another --run-dir or pass --overwrite")
        elif json.loads(marker.read_text())["fingerprint"] != fingerprint(recipe):
            raise RunDirError(
                f"{run_dir} holds a run of a different recipe (its copy: {run_dir / 'recipe.yml'}); "
                "choose another --run-dir, or pass --overwrite to delete that run"
            )


def prepare_run_dir(run_dir: Path, recipe: Recipe, overwrite: bool = False) -> Path:
    check_run_dir(run_dir, recipe, overwrite)
    marker = run_dir / RUN_FILE
    if overwrite and run_dir.exists() and (not marker.exists() or json.loads(marker.read_text())["fingerprint"] != fingerprint(recipe)):
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"fingerprint": fingerprint(recipe), "recipe": str(recipe.path)}, indent=2))
        (run_dir / "recipe.yml").write_text(recipe.text, encoding="utf-8")  # a genome file runs as its translation
    except OSError as e:
        raise RunDirError(f"cannot write the run folder {run_dir}: {e.strerror}") from None
    return run_dir
