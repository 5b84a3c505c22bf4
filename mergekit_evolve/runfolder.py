"""The run folder: every file and folder name of a run, and its life (create, resume, overwrite, lock).

This module is the only code that names a run's files; everything else asks a ``RunFolder``::

    runs/demo/
      run.json          fingerprint of what is searched; a resume must match it
      recipe.yml        the recipe as run (a genome file: its translation)
      study.db          the Optuna study (unless evolve.storage names another)
      examples.db       per-example results, reused by resumes and finalists
      trials.jsonl      one line a trial, exported from the study
      archives.json     CycleQD's archives
      report.json       winner vs sources, search and held-out
      pareto.json       multi-objective runs: the Pareto front
      plots/            history.png, pareto.png
      best/             the winner: a Hugging Face model folder (best.partial while written)
      stages.json       a staged recipe: which earlier winner each stage was searched with
      NAME/             a staged recipe: stage NAME's own run folder
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

RUN_FILE = "run.json"
RECIPE_FILE = "recipe.yml"
CONFIG_FILE = "mergekit_config.yml"  # inside best/: the winner's concrete mergekit config
CARD_FILE = "README.md"  # inside best/: the model card
BEST_DIR = "best"
LORA_MERGES_PREFIX = ".lora-merges."  # a temporary folder: mergekit's merged adapter copies while best/ is written


class RunDirError(RuntimeError):
    pass


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
    def study_db(self) -> Path:
        return self.path / "study.db"

    @property
    def examples_db(self) -> Path:
        return self.path / "examples.db"

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
    def stored_fingerprint(self) -> str | None:
        if not self.run_file.exists():
            return None
        return json.loads(self.run_file.read_text())["fingerprint"]

    def stored_recipe_path(self) -> Path | None:
        """Where the recipe of this run was when it ran (its relative paths are relative to its folder)."""
        if not self.run_file.exists():
            return None
        recipe = json.loads(self.run_file.read_text()).get("recipe")
        return Path(recipe) if recipe else None

    def check(self, fingerprint: str, overwrite: bool = False) -> None:
        """Refuse, without writing anything, a folder that holds something other than this run."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a folder")
        if self.path.exists() and any(self.path.iterdir()) and not overwrite:
            stored = self.stored_fingerprint()
            if stored is None:
                raise RunDirError(f"{self.path} exists and is not a mergekit-evolve run folder; "
                                  "choose another --run-dir or pass --overwrite")
            if stored != fingerprint:
                raise RunDirError(
                    f"{self.path} holds a run of a different recipe (its copy: {self.recipe}); "
                    "choose another --run-dir, or pass --overwrite to delete that run"
                )

    def prepare(self, fingerprint: str, recipe_path: Path, recipe_text: str, overwrite: bool = False) -> None:
        """Create (or resume) the folder for this run: ``run.json`` and the recipe copy."""
        self.check(fingerprint, overwrite)
        if overwrite and self.path.exists() and self.stored_fingerprint() != fingerprint:
            shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.run_file.write_text(json.dumps({"fingerprint": fingerprint, "recipe": str(recipe_path)}, indent=2))
            self.recipe.write_text(recipe_text, encoding="utf-8")
        except OSError as e:
            raise RunDirError(f"cannot write the run folder {self.path}: {e.strerror}") from None
