"""How published files name the run's source models: by Hub id when they have one, else by a name relative to
the recipe; never by a path of this machine."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from mergekit.common import ModelReference

from mergekit_evolve.runfolder import BEST_DIR, CARD_FILE

LOG = logging.getLogger(__name__)
CACHE_FOLDER = re.compile(r"^models--(?P<owner>[^/]+?)--(?P<name>[^/]+)$")  # huggingface_hub's cache layout
TEXT_SUFFIXES = (".md", ".yml", ".yaml", ".json", ".txt", ".jinja", ".py")
FRONT_MATTER = re.compile(r"^---\s*\n(.*?)\n---\s*$", re.DOTALL | re.MULTILINE)


def hub_id(model: str) -> str | None:
    """The Hub repo id of a mergekit model reference as written, or None when it names a local folder."""
    path = ModelReference.parse(model).model.path
    if os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path):
        return None
    try:
        validate_repo_id(path)
    except HFValidationError:
        return None
    return path


@dataclass
class SourceNames:
    """Names for the sources of one run. ``hub_ids`` maps local folders (resolved) to the Hub id they came from."""

    recipe_dir: Path | None
    run_dir: Path
    hub_ids: dict[Path, str] = field(default_factory=dict)

    @classmethod
    def for_run(cls, run_dir: Path, recipe_path: Path | None, hub_ids: dict[str, str]) -> SourceNames:
        recipe_dir = recipe_path.resolve().parent if recipe_path else None
        base = recipe_dir or Path.cwd()
        return cls(recipe_dir, run_dir.resolve(), {(base / k).resolve(): v for k, v in hub_ids.items()})

    def hub(self, model: str) -> str | None:
        """The Hub id of one model folder or id: as written, from the recipe's publish.hub_ids, or from the
        folder's place in the Hugging Face cache (models--OWNER--NAME/snapshots/...)."""
        if found := hub_id(model):
            return found
        path = Path(ModelReference.parse(model).model.path).resolve()
        if path in self.hub_ids:
            return self.hub_ids[path]
        for part in path.parts:
            if m := CACHE_FOLDER.match(part):
                return f"{m['owner']}/{m['name']}"
        return None

    def local(self, path: str) -> str:
        """A folder without a Hub id, as the recipe names it: relative to the recipe's folder, else relative to
        the staged run it belongs to (an earlier stage's ``best/``), else just its name."""
        resolved = Path(path).resolve()
        for root in filter(None, (self.recipe_dir, self.run_dir.parent if self.run_dir.name != BEST_DIR else None)):
            if resolved.is_relative_to(root) and resolved != root:
                return resolved.relative_to(root).as_posix()
        if resolved.name == BEST_DIR:
            return f"{resolved.parent.name}/{BEST_DIR}"
        return resolved.name

    def name(self, model: str) -> str:
        """One mergekit model reference (``model`` or ``model+lora``) as published."""
        ref = ModelReference.parse(model)
        parts = [ref.model.path] + ([ref.lora.path] if ref.lora else [])
        return "+".join(self.hub(p) or self.local(p) for p in parts)

    def is_local(self, model: str) -> bool:
        ref = ModelReference.parse(model)
        return any(self.hub(p.path) is None for p in (ref.model, ref.lora) if p is not None)

    def scrub(self, text: str, models: list[str]) -> str:
        """``text`` with every absolute path of ``models`` (and of their parts) replaced by its published name."""
        paths: dict[str, str] = {}
        for model in models:
            ref = ModelReference.parse(model)
            for part in filter(None, (ref.model, ref.lora)):
                if os.path.isabs(part.path):
                    paths[part.path] = self.hub(part.path) or self.local(part.path)
                    paths[str(Path(part.path).resolve())] = paths[part.path]
        for path in sorted(paths, key=len, reverse=True):  # a folder before its parent
            text = text.replace(path, paths[path])
        return text

    def common_license(self, models: list[str]) -> tuple[str | None, str]:
        """The license every one of ``models`` states in its card, else None; and why."""
        found = {self.name(m): self.license(m) for m in models}
        values = set(found.values())
        if len(values) == 1 and None not in values:
            return values.pop(), "the license of every source model"
        said = ", ".join(f"{name}: {value or 'no license found'}" for name, value in found.items())
        return None, f"the sources' cards say {said}"

    def license(self, model: str) -> str | None:
        """The license id in the model card front matter of a local folder, or of a Hub model in the local cache."""
        card = None
        path = Path(ModelReference.parse(model).model.path)
        if (path / CARD_FILE).is_file():
            card = path / CARD_FILE
        elif repo := self.hub(model):
            cached = try_to_load_from_cache(repo, CARD_FILE)
            card = Path(cached) if isinstance(cached, str) else None
        if card is None:
            return None
        match = FRONT_MATTER.search(card.read_text(encoding="utf-8", errors="replace"))
        try:
            data = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError:
            return None
        value = data.get("license") if isinstance(data, dict) else None
        return value if isinstance(value, str) else None


def template_models(template: Any) -> list[str]:
    """Every model reference a recipe's mergekit template names (``model:`` and ``base_model:`` strings)."""
    found: list[str] = []
    if isinstance(template, dict):
        for key, value in template.items():
            if key in ("model", "base_model") and isinstance(value, str):
                found.append(value)
            else:
                found += template_models(value)
    elif isinstance(template, list):
        for item in template:
            found += template_models(item)
    return list(dict.fromkeys(found))
