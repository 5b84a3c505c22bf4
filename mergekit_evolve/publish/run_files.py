"""What a finished run folder holds for publishing: the winner, its config and recipe, the report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pydantic
import yaml
from mergekit.config import MergeConfiguration

from mergekit_evolve.publish.errors import PublishError
from mergekit_evolve.publish.names import SourceNames
from mergekit_evolve.recipe.evolve_settings import EvolveSettings
from mergekit_evolve.recipe.publish_settings import PublishSettings
from mergekit_evolve.recipe.stages import KEY as STAGES_KEY
from mergekit_evolve.recipe.stages import stage_body
from mergekit_evolve.runfolder import RunFolder


@dataclass
class RunFiles:
    run_dir: Path

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)

    @property
    def best(self) -> Path:
        return self.folder.best

    def plots(self) -> dict[str, tuple[str, Path]]:
        """The plots this run has: kind -> (name in best/, file), from plots/ or else best/, where the
        card (and the Space) embed them under their file name."""
        found = {}
        for kind, written in self.folder.plots.items():
            name = written.name
            for path in (written, self.best / name):
                if path.is_file():
                    found[kind] = (name, path)
                    break
        return found

    @cached_property
    def report(self) -> dict[str, Any]:
        path = self.folder.report
        try:
            return json.loads(self._read(path))
        except json.JSONDecodeError as e:
            raise PublishError(f"{path}: not valid JSON ({e})") from None

    @cached_property
    def config_text(self) -> str:
        return self._read(self.folder.best_config)

    @cached_property
    def config(self) -> MergeConfiguration:
        return MergeConfiguration.model_validate(yaml.safe_load(self.config_text))

    @cached_property
    def recipe_text(self) -> str:
        return self._read(self.folder.best_recipe)

    @cached_property
    def _recipe_file_data(self) -> Any:
        return yaml.safe_load(self.recipe_text)

    @property
    def stage(self) -> str | None:
        """The stage name when the recipe is staged (each stage runs in RUN_DIR/NAME)."""
        data = self._recipe_file_data
        return (self.run_dir.resolve().name if isinstance(data, dict) and isinstance(data.get(STAGES_KEY), list)
                else None)

    @cached_property
    def _recipe_data(self) -> dict[str, Any]:
        return stage_body(self._recipe_file_data, self.stage)

    @cached_property
    def evolve(self) -> EvolveSettings:
        return self._section(EvolveSettings, "evolve")

    @cached_property
    def publish(self) -> PublishSettings:
        return self._section(PublishSettings, "publish")

    @cached_property
    def names(self) -> SourceNames:
        return SourceNames.for_run(self.run_dir, self.folder.stored_recipe_path(), self.publish.hub_ids)

    def published_config(self) -> str:
        """The winner's mergekit config as published: sources by Hub id, local ones relative to the recipe."""
        text = self.names.scrub(self.config_text, self.sources)
        local = [self.names.name(m) for m in self.sources if self.names.is_local(m)]
        if not local:
            return text
        note = (
            f"# Not on the Hub: {', '.join(local)} (folders relative to the recipe that produced this merge).\n"
            "# Replace them with their Hub ids, or put the folders there, to merge it again.\n"
        )
        return note + text

    def published_recipe(self) -> str:
        return self.names.scrub(self.recipe_text, self.sources)

    def license(self) -> tuple[str | None, str]:
        """The license for the card: publish.license, else the one every source's card states; and why."""
        if self.publish.license:
            return self.publish.license, "set in the recipe's publish section"
        return self.names.common_license(self.sources)

    @property
    def sources(self) -> list[str]:
        """Every source model as the report names it (str of a mergekit ModelReference), base first."""
        return list(self.report["sources"])

    @property
    def name(self) -> str:
        return self.report.get("study") or self.run_dir.resolve().name

    def check(self) -> None:
        """Fail early, naming the missing piece, if this is not a finished run folder."""
        stages = self.folder.stages()
        if not self.best.is_dir() and stages:
            raise PublishError(
                f"{self.run_dir} is a staged run; give one stage's folder: "
                + ", ".join(str(self.run_dir / s) for s in stages)
            )
        if not self.best.is_dir() or not (self.best / "config.json").is_file():
            raise PublishError(f"{self.best} holds no merged model: run the search first "
                               f"(mergekit-evolve RECIPE -o {self.run_dir})")
        if not any(self.best.glob("*.safetensors")):
            raise PublishError(f"{self.best} holds no .safetensors weights")
        # load each piece now, so a broken file is reported before anything is written or sent
        _ = (self.report, self.config, self.evolve, self.publish)

    def _section(self, model: type[pydantic.BaseModel], key: str) -> Any:
        try:
            return model.model_validate(self._recipe_data.get(key) or {})
        except pydantic.ValidationError as e:
            raise PublishError(f"{self.folder.best_recipe}: '{key}' section: {e.errors()[0]['msg']}") from None

    def _read(self, path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise PublishError(f"{path}: {e.strerror}; "
                               f"is {self.run_dir} a finished mergekit-evolve run folder?") from None
