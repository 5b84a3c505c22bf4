"""The run folder: every file and folder name of a run, and its life (create, resume, overwrite, lock).

This module is the only code that names a run's files; everything else asks a ``RunFolder``::

    runs/demo/
      run.json          fingerprint of what is searched (and of the config and task files); a resume must match it
      run.lock          held by the process running here: its host and pid
      failures.log      each failed trial's traceback
      recipe.yml        the recipe as run (a genome file: its translation)
      study.db          the Optuna study (unless evolve.storage names another)
      examples.db       per-example results, reused by resumes and finalists
      source_scores.json  the sources' whole-split scores (a staged run: one file at its root, shared by the stages)
      trials.jsonl      one line a trial, exported from the study
      archives.json     CycleQD's archives
      report.json       winner vs sources, search and held-out
      pareto.json       multi-objective runs: the Pareto front
      plots/            history.png, pareto.png
      best/             the winner: a Hugging Face model folder (best.partial while written)
        adapter/        a LoRA-particle winner (swarm, particle_kind: lora) also as its PEFT adapter
      stages.json       a staged recipe: which earlier winner each stage was searched with
      NAME/             a staged recipe: stage NAME's own run folder
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
RECIPE_FILE = "recipe.yml"
CONFIG_FILE = "mergekit_config.yml"  # inside best/: the winner's concrete mergekit config
CARD_FILE = "README.md"  # inside best/: the model card
BEST_DIR = "best"
BEST_ADAPTER_DIR = "adapter"  # inside best/: a LoRA-particle winner as a PEFT adapter folder
LORA_MERGES_PREFIX = ".lora-merges."  # a temporary folder: mergekit's merged adapter copies while best/ is written
LOCK_FILE = "run.lock"
LOG = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    pass


def process_gone(host: str, pid: int) -> bool:
    """Whether process ``pid`` of ``host`` has certainly ended (only this host's processes can be known)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@dataclass(frozen=True)
class RunFolder:
    path: Path

    # --- what a run writes -------------------------------------------------------------------
    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def recipe(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def log(self) -> Path:
        return self.path / "failures.log"

    @property
    def study_db(self) -> Path:
        return self.path / "study.db"

    @property
    def examples_db(self) -> Path:
        return self.path / "examples.db"

    @property
    def source_scores(self) -> Path:
        return self.path / "source_scores.json"

    @property
    def trials(self) -> Path:
        return self.path / "trials.jsonl"

    @property
    def archives(self) -> Path:
        return self.path / "archives.json"

    @property
    def report(self) -> Path:
        return self.path / "report.json"

    @property
    def pareto(self) -> Path:
        return self.path / "pareto.json"

    @property
    def plots(self) -> dict[str, Path]:
        """Plot kind -> where the run writes it; ``best/`` keeps each under its file name."""
        return {kind: self.path / "plots" / f"{kind}.png" for kind in ("history", "pareto")}

    @property
    def best(self) -> Path:
        return self.path / BEST_DIR

    @property
    def best_config(self) -> Path:
        return self.best / CONFIG_FILE

    @property
    def best_adapter(self) -> Path:
        return self.best / BEST_ADAPTER_DIR

    @property
    def best_recipe(self) -> Path:
        return self.best / RECIPE_FILE

    @property
    def stages_state(self) -> Path:
        return self.path / "stages.json"

    def stage(self, name: str) -> RunFolder:
        """Stage ``name``'s own run folder inside a staged run."""
        return RunFolder(self.path / name)

    def stages(self) -> list[str]:
        """The names of the stages that wrote a winner here, in name order."""
        return sorted(p.parents[1].name for p in self.path.glob(f"*/{BEST_DIR}/config.json"))

    # --- life ---------------------------------------------------------------------------------
    def stored(self) -> dict[str, Any]:
        """What ``run.json`` recorded when the run started (empty when there is none)."""
        return json.loads(self.run_file.read_text()) if self.run_file.exists() else {}

    def stored_recipe_path(self) -> Path | None:
        """Where the recipe of this run was when it ran (its relative paths are relative to its folder)."""
        recipe = self.stored().get("recipe")
        return Path(recipe) if recipe else None


    def stored_fingerprint(self) -> str | None:
        return self.stored().get("fingerprint")

    # --- one process per folder ------------------------------------------------------------
    def holder(self) -> dict[str, Any] | None:
        """The live process that holds this folder's lock; a lock left by a dead process of this host is removed."""
        try:
            holder = json.loads(self.lock_file.read_text())
        except OSError:  # no lock (or no folder to hold one: writing it will say why)
            return None
        except ValueError:  # half-written by a process that died writing it
            holder = {"host": "?", "pid": -1}
        if process_gone(holder.get("host", "?"), int(holder.get("pid", -1))):
            LOG.warning("removing the lock %s left by process %s on %s, which has ended",
                        self.lock_file, holder.get("pid"), holder.get("host"))
            self.lock_file.unlink(missing_ok=True)
            return None
        return holder

    def check_lock(self) -> None:
        holder = self.holder()
        if holder is not None:
            raise RunDirError(
                f"{self.path} is in use by process {holder.get('pid')} on {holder.get('host')} (since "
                f"{holder.get('since', '?')}); wait for it, or choose another --run-dir. If that process is gone "
                f"(another host crashed), delete {self.lock_file}"
            )

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this folder for this process (creating the folder): a second process is refused, naming this one."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot write the run folder {self.path}: {e.strerror}") from None
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):  # a second try after removing a dead process's lock
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                self.check_lock()
            except OSError as e:
                raise RunDirError(f"cannot write the run folder {self.path}: "
                                  f"{os.strerror(e.errno or errno.EIO)}") from None
        else:
            raise RunDirError(f"cannot take the lock {self.lock_file}: it keeps reappearing")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        try:
            yield
        finally:
            self.lock_file.unlink(missing_ok=True)

    # --- create, resume, overwrite ----------------------------------------------------------
    def check(self, fingerprint: str | tuple[str, ...], overwrite: bool = False) -> None:
        """Refuse, without writing anything, a folder that holds something other than this run, or that
        another process uses."""
        self.check_lock()
        self.check_contents(fingerprint, overwrite)

    def check_contents(self, fingerprint: str | tuple[str, ...], overwrite: bool = False) -> None:
        """``fingerprint``: this run's, or every one its folder may hold (the current one first)."""
        accepted = (fingerprint,) if isinstance(fingerprint, str) else fingerprint
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a folder")
        if self.path.exists() and any(p.name != LOCK_FILE for p in self.path.iterdir()) and not overwrite:
            stored = self.stored_fingerprint()
            if stored is None:
                raise RunDirError(f"{self.path} exists and is not a mergekit-evolve run folder; "
                                  "choose another --run-dir or pass --overwrite")
            if stored not in accepted:
                raise RunDirError(
                    f"{self.path} holds a run of a different recipe (its copy: {self.recipe}); "
                    "choose another --run-dir, or pass --overwrite to delete that run"
                )

    def clear(self) -> None:
        """Delete everything the folder holds but its lock (``--overwrite``)."""
        for p in self.path.iterdir():
            if p.name != LOCK_FILE:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def prepare(self, fingerprint: str | tuple[str, ...], recipe_path: Path, recipe_text: str,
                overwrite: bool = False, **facts: Any) -> None:
        """Create (or resume) the folder for this run: ``run.json`` (with ``facts``) and the recipe copy.

        ``fingerprint`` as for ``check_contents``; ``run.json`` keeps the first."""
        self.check_contents(fingerprint, overwrite)
        accepted = (fingerprint,) if isinstance(fingerprint, str) else fingerprint
        fingerprint = accepted[0]
        if overwrite and self.path.exists() and self.stored_fingerprint() not in accepted:
            self.clear()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.run_file.write_text(json.dumps({"fingerprint": fingerprint, "recipe": str(recipe_path), **facts},
                                                indent=2))
            self.recipe.write_text(recipe_text, encoding="utf-8")
        except OSError as e:
            raise RunDirError(f"cannot write the run folder {self.path}: {e.strerror}") from None
