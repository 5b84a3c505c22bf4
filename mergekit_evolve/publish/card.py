"""The winner's model card: Hub front matter with scores, what was merged and how, and how to use it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from mergekit.card import method_md
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration

from mergekit_evolve.methods.registry import register_plugins
from mergekit_evolve.publish.run_files import RunFiles, hub_id
from mergekit_evolve.recipe.evolve_settings import Objective
from mergekit_evolve.runfolder import (
    BEST_DIR,
    CARD_FILE,
    CONFIG_FILE,
    RECIPE_FILE,
    RunFolder,
)

LOG = logging.getLogger(__name__)
PROJECT = "mergekit-evolve"
LINEAGE_DEPTH = 4

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ intro }}

## Merge

{{ merge }}

## Results

{{ results }}

## Search

{{ search }}
{% if lineage %}
## Lineage

{{ lineage }}
{% endif %}
## Usage

{{ usage }}

## Configuration

The concrete mergekit configuration of the winner; {{ reproduce }} reproduces these weights:

```yaml
{{ config_yaml }}
```

## Recipe

The {{ project }} recipe that produced it (a mergekit config whose values may be search annotations, plus the
`evolve:` section):

```yaml
{{ recipe_yaml }}
```
"""


def _model_md(model: str) -> str:
    ref = ModelReference.parse(model)
    parts = [ref.model] + ([ref.lora] if ref.lora else [])
    return " + ".join(
        f"[{p.path}](https://huggingface.co/{p.path})" if hub_id(p.path) else f"local folder `{p.path}`" for p in parts
    )


def _short(model: str) -> str:
    """A Hub id, else the folder name; an earlier run's ``best/`` is named with its run folder (e.g. ``ps/best``)."""
    path = Path(ModelReference.parse(model).model.path)
    return hub_id(model) or (f"{path.parent.name}/{path.name}" if path.name == BEST_DIR else path.name)


def _base_models(run: RunFiles) -> list[str]:
    """Hub ids of every merged model (and LoRA); local folders are named in the text instead."""
    ids: list[str] = []
    for ref in map(ModelReference.parse, run.sources):  # the report's order: base first, then as in the recipe
        for part in (ref.model, ref.lora):
            if part is not None and hub_id(part.path) and part.path not in ids:
                ids.append(part.path)
    return ids


def _heldout_task(o: Objective) -> str:
    return o.heldout_task or o.task


def _eval_results(run: RunFiles) -> list[EvalResult]:
    per = run.report["winner"]["per_objective"]
    results = []
    for o in run.evolve.objectives:
        for split, task in (("search", o.task), ("heldout", _heldout_task(o))):
            results.append(EvalResult(
                task_type="text-generation",
                dataset_type=task,
                dataset_name=f"{task} ({'search' if split == 'search' else 'held-out'} split of the {PROJECT} run)",
                metric_type=o.metric.split(",")[0],
                metric_name=o.metric,
                metric_value=round(per[split][o.name], 6),
            ))
    return results


def card_data(run: RunFiles, model_name: str) -> ModelCardData:
    config = run.config
    return ModelCardData(
        model_name=model_name,
        base_model=_base_models(run) or None,
        base_model_relation="merge",
        library_name="transformers",
        license=run.publish.license,
        pipeline_tag="text-generation",
        tags=["merge", "mergekit", PROJECT, config.merge_method, run.evolve.sampler],
        eval_results=_eval_results(run),
    )


def _intro(run: RunFiles) -> str:
    report = run.report
    best_source = max(report["sources"].items(), key=lambda kv: kv[1]["heldout"], default=None)
    text = (
        f"A merge of {len(report['sources'])} models found by an evolutionary search with {PROJECT}: "
        f"an Optuna `{run.evolve.sampler}` sampler proposed {report['trials']} candidate mergekit configurations, "
        f"each was merged and scored with lm-eval on `{report['objective']}`, and this model is the best "
        f"(trial {report['winner']['trial']})."
    )
    if run.stage:
        text += f" It is stage `{run.stage}` of a staged recipe; the Lineage section shows what earlier stages made."
    if best_source:
        name, row = best_source
        text += (
            f" On the held-out split it scores {report['winner']['heldout']:.4f} (weighted objective) "
            f"against {row['heldout']:.4f} for the best source model, {_short(name)}."
        )
    return text


def _merge_md(run: RunFiles) -> str:
    config = run.config
    lines = [f"Method: {method_md(config.merge_method)}, dtype `{config.dtype or 'as the sources'}`."]
    if config.base_model is not None:
        lines.append(f"Base model: {_model_md(str(config.base_model))}.")
    lines += ["", "Models merged:", ""]
    base = str(config.base_model) if config.base_model is not None else None
    lines += [f"- {_model_md(m)}" for m in run.sources if m != base]
    point = run.report["winner"].get("point") or {}
    if point:
        lines += ["", "Searched values of the winner:", "", "| dimension | value |", "|---|---|"]
        lines += [f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in point.items()]
    return "\n".join(lines)


def _results_md(run: RunFiles) -> str:
    report = run.report
    objectives = run.evolve.objectives
    header = ["model"]
    weighted = len(objectives) > 1 or any(o.goal == "minimize" for o in objectives)
    if weighted:
        header += ["weighted (search)", "weighted (held-out)"]
    for o in objectives:
        header += [f"{o.task} {o.metric} (search)", f"{_heldout_task(o)} {o.metric} (held-out)"]

    def row(label: str, entry: dict[str, Any]) -> str:
        cells = [label]
        if weighted:
            cells += [f"{entry['search']:.4f}", f"{entry['heldout']:.4f}"]
        for o in objectives:
            cells += [f"{entry['per_objective'][split][o.name]:.4f}" for split in ("search", "heldout")]
        return "| " + " | ".join(cells) + " |"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append(row("**this merge**", report["winner"]))
    lines += [row(_short(name), entry) for name, entry in report["sources"].items()]
    notes = [f"Objective: `{report['objective']}` (higher is better; objectives to minimise enter it negated)."]
    same = [o.task for o in objectives if not o.heldout_task]
    if same:
        notes.append(
            f"No separate held-out task was given for {', '.join(f'`{t}`' for t in same)}: its held-out column "
            "re-scores the search task (with `heldout_limit`), so it is not independent of the search."
        )
    return "\n".join(lines) + "\n\n" + " ".join(notes)


PLOT_CAPTIONS = {
    "history": "search history: the objective of every trial and the best so far",
    "pareto": "Pareto front of the objectives; the winner is marked",
}


def _search_md(run: RunFiles) -> str:
    ev = run.evolve
    lines = [
        f"Sampler `{ev.sampler}` (seed {ev.seed}{', options ' + json.dumps(ev.sampler_options.given()) if ev.sampler_options.given() else ''}), "
        f"{run.report['trials']} trials in study `{run.report.get('study', run.name)}`. Objectives:",
        "",
    ]
    for o in ev.objectives:
        limit = f", limit {o.limit}" if o.limit is not None else ""
        lines.append(f"- `{o.task}` `{o.metric}` ({o.goal}, weight {o.weight:g}{limit})")
    for kind, (name, _) in run.plots().items():
        lines += ["", f"![{PLOT_CAPTIONS[kind]}]({name})"]
    return "\n".join(lines)


def _lineage_md(run: RunFiles) -> str:
    """Sources that are themselves merges, e.g. the winner of an earlier stage, down to their own sources."""
    lines: list[str] = []
    seen: set[str] = set()

    def walk(model: str, depth: int) -> None:
        folder = Path(ModelReference.parse(model).model.path)
        config_file = folder / CONFIG_FILE
        if depth >= LINEAGE_DEPTH or str(folder) in seen or not config_file.is_file():
            return
        seen.add(str(folder))
        config = MergeConfiguration.model_validate(yaml.safe_load(config_file.read_text(encoding="utf-8")))
        found_by = ""
        if (folder / RECIPE_FILE).is_file():
            found_by = f" found by {PROJECT}"
            report = RunFolder(folder.parent).report
            if report.is_file():
                winner = json.loads(report.read_text(encoding="utf-8"))["winner"]
                found_by += f" (trial {winner['trial']}, search {winner['search']:.4f}, held-out {winner['heldout']:.4f})"
        lines.append(f"{'  ' * depth}- {_short(model)}: a `{config.merge_method}` merge{found_by} of")
        for ref in map(str, config.referenced_models()):
            lines.append(f"{'  ' * (depth + 1)}- {_model_md(ref)}")
            walk(ref, depth + 2)

    for model in run.sources:
        walk(model, 0)
    return "\n".join(lines)


def _reproduce(method: str) -> str:
    """The command that merges the config again: mergekit's own, unless the method is one this package adds."""
    if method in register_plugins():
        return f"`mergekit-evolve merge mergekit_config.yml OUT` (`{method}` is a merge method {PROJECT} registers with mergekit)"
    return "a plain `mergekit-yaml mergekit_config.yml OUT`"


def _chat_template(best: Path) -> bool:
    if (best / "chat_template.jinja").is_file():
        return True
    tok_config = best / "tokenizer_config.json"
    return tok_config.is_file() and bool(json.loads(tok_config.read_text(encoding="utf-8")).get("chat_template"))


def _usage_md(model_id: str, chat: bool) -> str:
    code = [
        "```python",
        "from transformers import pipeline",
        "",
        f'generator = pipeline("text-generation", model="{model_id}")',
    ]
    if chat:
        code += [
            'messages = [{"role": "user", "content": "Hello! What can you do?"}]',
            "# the tokenizer's chat template formats the conversation",
            'reply = generator(messages, max_new_tokens=128)[0]["generated_text"][-1]["content"]',
            "print(reply)",
        ]
    else:
        code += [
            "# the tokenizer has no chat template: prompt with plain text",
            'print(generator("Your prompt here", max_new_tokens=64)[0]["generated_text"])',
        ]
    return "\n".join(code + ["```"])


def build_card(run: RunFiles, repo_id: str | None = None) -> ModelCard:
    """The card for ``run``'s winner; ``repo_id`` (else the recipe's publish.repo) names it in the usage snippet."""
    repo_id = repo_id or run.publish.repo
    model_name = repo_id.split("/")[1] if repo_id else run.name
    return ModelCard.from_template(
        card_data(run, model_name),
        template_str=TEMPLATE,
        model_name=model_name,
        project=PROJECT,
        intro=_intro(run),
        merge=_merge_md(run),
        results=_results_md(run),
        search=_search_md(run),
        lineage=_lineage_md(run),
        usage=_usage_md(repo_id or str(run.best.resolve()), _chat_template(run.best)),
        reproduce=_reproduce(run.config.merge_method),
        config_yaml=run.config_text.strip(),
        recipe_yaml=run.recipe_text.strip(),
    )


def write_card(run_dir: Path) -> Path:
    """Write ``best/README.md`` (replacing mergekit's plain card) and copy the run's plots beside it."""
    run = RunFiles(Path(run_dir))
    run.check()
    for name, path in run.plots().values():
        if path != run.best / name:
            shutil.copyfile(path, run.best / name)
    out = run.best / CARD_FILE
    out.write_text(str(build_card(run)) + "\n", encoding="utf-8")
    LOG.info("model card written to %s", out)
    return out
