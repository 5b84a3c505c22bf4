"""The Gradio Space of a run, filled in from the packaged ``gradio_template/``: for the Hub, or to run locally."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

from huggingface_hub import SpaceCard, SpaceCardData

from mergekit_evolve.publish.errors import PublishError
from mergekit_evolve.publish.run_files import RunFiles, hub_id
from mergekit_evolve.runfolder import CONFIG_FILE, RECIPE_FILE

TEMPLATE_DIR = Path(__file__).resolve().parent / "gradio_template"  # package data: in the wheel too
TEMPLATE_FILES = ("app.py", "requirements.txt")
SETTINGS_FILE = "space_config.json"  # the name gradio_template/app.py looks for beside itself
MODEL_VARIABLE = "MODEL_ID"  # the Space variable gradio_template/app.py reads the merged model's id from

README = """---
{{ card_data }}
---

# {{ title }}

Try [{{ repo_id }}](https://huggingface.co/{{ repo_id }}), a merge found by an evolutionary search with
mergekit-evolve: chat with it, run the same prompt through it and its parent models side by side, and see the
search history, the scores and the mergekit configuration.

The model id comes from the Space variable `{{ variable }}`; `space_config.json` holds the parents and the
titles. It runs on whatever hardware the Space has (CPU by default; large models want a GPU).{{ private_note }}
"""


def template_path(name: str) -> Path:
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise PublishError(f"the Space template {path} is missing: reinstall mergekit-evolve (its wheel ships publish/gradio_template/)")
    return path


def _settings(run: RunFiles, model: str, parents: list[str], assets: dict[str, str], **extra: Any) -> dict[str, Any]:
    report = run.report
    return {
        "title": f"{run.name}: a mergekit-evolve merge",
        "description": f"Winner of {report['trials']} trials (trial {report['winner']['trial']}), objective `{report['objective']}`.",
        "model": model,
        "parents": [{"label": label, "model": p} for label, p in zip(_labels(parents), parents)],
        **assets,
        **extra,
    }


def _labels(models: list[str]) -> list[str]:
    """Hub ids, or folder names; the full path where two folders share a name."""
    short = [hub_id(m) or Path(m).name for m in models]
    return [s if short.count(s) == 1 else m for s, m in zip(short, models)]


def local_settings(run: RunFiles) -> dict[str, Any]:
    """Settings to run the app on ``best/`` and the source models on this machine's CPU."""
    plots = run.plots()
    assets = {
        **{kind: str(plots[kind][1].resolve()) if kind in plots else None for kind in run.folder.plots},
        "report": str(run.folder.report.resolve()),
        "config": str(run.folder.best_config.resolve()),
        "recipe": str(run.folder.best_recipe.resolve()),
    }
    return _settings(run, str(run.best.resolve()), run.sources, assets, device="cpu")


def space_files(run: RunFiles, repo_id: str, space_id: str, private: bool) -> dict[str, Path | bytes]:
    """Every file of the Space (path in the repo -> local file or content)."""
    plots = run.plots()
    assets = {
        **{kind: plots[kind][0] if kind in plots else None for kind in run.folder.plots},
        "report": run.folder.report.name, "config": CONFIG_FILE, "recipe": RECIPE_FILE,
    }
    # Only Hub-hosted parents can be loaded by the Space.
    parents = [p for p in run.sources if hub_id(p)]
    settings = _settings(run, repo_id, parents, assets)
    files: dict[str, Path | bytes] = {name: template_path(name) for name in TEMPLATE_FILES}
    files["README.md"] = str(_readme(run, repo_id, space_id, parents, private)).encode()
    files[SETTINGS_FILE] = json.dumps(settings, indent=2).encode()
    files[run.folder.report.name] = run.folder.report
    files[CONFIG_FILE] = run.folder.best_config
    files[RECIPE_FILE] = run.folder.best_recipe
    files.update(dict(plots.values()))
    return files


def _readme(run: RunFiles, repo_id: str, space_id: str, parents: list[str], private: bool) -> SpaceCard:
    title = space_id.split("/")[1]
    data = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=version("gradio"),  # the version this app was tested with here
        app_file="app.py",
        license=run.publish.license,
        models=[repo_id] + [hub_id(p) for p in parents],
        tags=["mergekit-evolve", "merge", "mergekit"],
        emoji="🧬",
        colorFrom="indigo",
        colorTo="green",
        short_description=f"Chat with {repo_id.split('/')[1]} and its parents"[:60],
        pinned=False,
    )
    note = (
        "\n\nThe model repo is private: add a read token as the Space secret `HF_TOKEN` so the Space can load it."
        if private else ""
    )
    return SpaceCard.from_template(
        data, template_str=README, title=title, repo_id=repo_id, variable=MODEL_VARIABLE, private_note=note
    )
