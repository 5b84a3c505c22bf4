"""The Gradio Space of a run, filled in from the packaged ``gradio_template/``: for the Hub, or to run locally."""

from __future__ import annotations

import json
import logging
from importlib.metadata import version
from pathlib import Path
from typing import Any

from huggingface_hub import SpaceCard, SpaceCardData

from mergekit_evolve.evaluate.suite import TaskSuite
from mergekit_evolve.publish.card import objective_md
from mergekit_evolve.publish.errors import PublishError
from mergekit_evolve.publish.run_files import RunFiles
from mergekit_evolve.runfolder import CONFIG_FILE, RECIPE_FILE

LOG = logging.getLogger(__name__)
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

The model id comes from the Space variable `{{ variable }}`; `space_config.json` holds the parents, the
titles and the example prompts. The app keeps one model in memory at a time (a parent is loaded when a
comparison needs it, and released after), so it needs memory for the largest one: about {{ size }}, which
`{{ hardware }}` has. On ZeroGPU hardware it asks for a GPU only while it generates.{{ private_note }}
"""


def template_path(name: str) -> Path:
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise PublishError(f"the Space template {path} is missing: reinstall mergekit-evolve "
                           "(its wheel ships publish/gradio_template/)")
    return path


# Space hardware (the Hub's flavor names) by the memory one model needs: its weights plus room to generate.
HARDWARE = (
    (1.5e9, "cpu-basic"),  # 16 GB RAM, 2 vCPU: slow but free
    (12e9, "t4-small"),  # 16 GB GPU
    (20e9, "l4x1"),  # 24 GB GPU
    (40e9, "l40sx1"),  # 48 GB GPU
    (70e9, "a100-large"),  # 80 GB GPU
)
COMPARE_DEFAULT = 2  # parents ticked for a comparison: the ones that score best on held-out data
EXAMPLES = 3


def _settings(run: RunFiles, model: str, parents: dict[str, str], assets: dict[str, str],
              **extra: Any) -> dict[str, Any]:
    """``parents``: the model id or folder of each parent the app can load -> the source it is in the report."""
    report = run.report
    ranked = sorted(parents, key=lambda p: report["sources"][parents[p]]["heldout"], reverse=True)
    labels = {p: run.names.name(parents[p]) for p in parents}
    return {
        "title": f"{run.name}: a mergekit-evolve merge",
        "description": f"Winner of {report['trials']} trials (trial {report['winner']['trial']}), searched for "
                       f"{objective_md(run)}.",
        "model": model,
        "parents": [{"label": labels[p], "model": p} for p in parents],
        "compare_default": [labels[p] for p in ranked[:COMPARE_DEFAULT]],
        "local_parents": [run.names.name(s) for s in run.sources if s not in parents.values()],
        "examples": _examples(run),
        **assets,
        **extra,
    }


def _examples(run: RunFiles) -> list[str]:
    """A prompt from each objective's search task, as the model saw them in the search."""
    recipe = run.folder.stored_recipe_path()
    try:
        prompts = TaskSuite(run.evolve, recipe.parent if recipe else Path.cwd()).example_prompts()
    except Exception as e:  # lm-eval loading a task's data: the Space still works without examples
        LOG.warning("no example prompts for the Space (%s)", e)
        return []
    return prompts[:EXAMPLES]


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def suggested_hardware(size: int) -> str:
    for limit, flavor in HARDWARE:
        if size * 1.2 <= limit:
            return flavor
    LOG.warning("the largest model is %.0f GB: more than one GPU of a Space holds; suggesting a100-large anyway",
                size / 1e9)
    return HARDWARE[-1][1]


def local_settings(run: RunFiles) -> dict[str, Any]:
    """Settings to run the app on ``best/`` and the source models on this machine's CPU."""
    plots = run.plots()
    assets = {
        **{kind: str(plots[kind][1].resolve()) if kind in plots else None for kind in run.folder.plots},
        "report": str(run.folder.report.resolve()),
        "config": str(run.folder.best_config.resolve()),
        "recipe": str(run.folder.best_recipe.resolve()),
    }
    return _settings(run, str(run.best.resolve()), {s: s for s in run.sources}, assets, device="cpu")


def space_files(run: RunFiles, repo_id: str, space_id: str, private: bool,
                license: str | None) -> dict[str, Path | bytes]:
    """Every file of the Space (path in the repo -> local file or content)."""
    plots = run.plots()
    assets = {
        **{kind: plots[kind][0] if kind in plots else None for kind in run.folder.plots},
        "report": run.folder.report.name, "config": CONFIG_FILE, "recipe": RECIPE_FILE,
    }
    # Only parents on the Hub can be loaded by the Space.
    parents = {run.names.hub(s): s for s in run.sources if not run.names.is_local(s) and "+" not in run.names.name(s)}
    settings = _settings(run, repo_id, parents, assets)
    files: dict[str, Path | bytes] = {name: template_path(name) for name in TEMPLATE_FILES}
    files["README.md"] = str(_readme(run, repo_id, space_id, list(parents), private, license)).encode()
    files[SETTINGS_FILE] = json.dumps(settings, indent=2).encode()
    files[run.folder.report.name] = run.folder.report
    files[CONFIG_FILE] = run.published_config().encode()
    files[RECIPE_FILE] = run.published_recipe().encode()
    files.update(dict(plots.values()))
    return files


def _readme(run: RunFiles, repo_id: str, space_id: str, parents: list[str], private: bool,
            license: str | None) -> SpaceCard:
    title = space_id.split("/")[1]
    # the largest model the app loads: the merge, or a parent no larger than the merge's sources
    size = model_bytes(run.best)
    hardware = suggested_hardware(size)
    data = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=version("gradio"),  # the version this app was tested with here
        app_file="app.py",
        license=license,
        models=[repo_id] + parents,
        suggested_hardware=hardware,
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
        data, template_str=README, title=title, repo_id=repo_id, variable=MODEL_VARIABLE, private_note=note,
        size=f"{max(size * 1.2 / 1e9, 0.1):.1f} GB", hardware=hardware,
    )
