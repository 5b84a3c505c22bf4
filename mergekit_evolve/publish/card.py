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

from mergekit_evolve.evaluate.task_facts import TaskFacts, task_facts
from mergekit_evolve.methods.registry import register_plugins
from mergekit_evolve.publish.run_files import RunFiles
from mergekit_evolve.recipe.evolve_settings import JudgeObjective, Objective, RewardObjective, TaskObjective
from mergekit_evolve.runfolder import (
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

## Evaluation

{{ evaluation }}

## Search

{{ search }}
{% if lineage %}
## Lineage

{{ lineage }}
{% endif %}
## Usage

{{ usage }}

## Limitations

{{ limitations }}

## Configuration

The concrete mergekit configuration of the winner (`mergekit_config.yml` in this repo); {{ reproduce }}:

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


METRIC_NAMES = {
    "acc": "accuracy", "acc_norm": "normalized accuracy", "exact_match": "exact match", "f1": "F1",
    "mcc": "Matthews correlation", "bleu": "BLEU", "perplexity": "perplexity", "word_perplexity": "word perplexity",
    "byte_perplexity": "byte perplexity", "bits_per_byte": "bits per byte",
}


def metric_name(metric: str) -> str:
    """lm-eval's ``acc,none`` as a reader says it: ``accuracy``; a filter other than none is kept:
    ``exact match (strict-match)``."""
    name, _, flt = metric.partition(",")
    return METRIC_NAMES.get(name, name.replace("_", " ")) + (f" ({flt})" if flt and flt != "none" else "")


def _model_md(run: RunFiles, model: str) -> str:
    ref = ModelReference.parse(model)
    parts = []
    for part in filter(None, (ref.model, ref.lora)):
        repo = run.names.hub(part.path)
        parts.append(f"[{repo}](https://huggingface.co/{repo})" if repo
                     else f"local folder `{run.names.local(part.path)}`")
    return " + ".join(parts)


def _base_models(run: RunFiles) -> list[str]:
    """Hub ids of every merged model (and LoRA); local folders are named in the text instead."""
    ids: list[str] = []
    for ref in map(ModelReference.parse, run.sources):  # the report's order: base first, then as in the recipe
        for part in filter(None, (ref.model, ref.lora)):
            repo = run.names.hub(part.path)
            if repo and repo not in ids:
                ids.append(repo)
    return ids


def _facts(run: RunFiles) -> dict[str, TaskFacts]:
    ev = run.evolve
    # only lm-eval tasks have configs to read; other objectives are named by their files
    names = {t for o in ev.objectives if isinstance(o, TaskObjective) for t in (o.scored_on, o.heldout_scored_on)}
    recipe = run.folder.stored_recipe_path()
    base = recipe.parent if recipe else Path.cwd()
    try:
        return task_facts(names, [base / p for p in ev.task_paths])
    except Exception as e:  # lm-eval's indexing of a task folder: the card still names the tasks
        LOG.warning("could not read the lm-eval task configs (%s): the card names the tasks without their datasets", e)
        return {}


def _eval_results(run: RunFiles, facts: dict[str, TaskFacts]) -> list[EvalResult]:
    """The held-out scores only: the search scores are the best of many trials on the same examples."""
    per = run.report["winner"]["per_objective"]["heldout"]
    results = []
    for o in run.evolve.objectives:
        task = o.heldout_scored_on
        f = facts.get(task) or TaskFacts(task)
        kind = "held-out" if o.separate_heldout else "held-out re-score of the search task"
        results.append(EvalResult(
            task_type="text-generation",
            task_name=task,
            dataset_type=f.dataset or task,
            dataset_name=f"{f.dataset or task} ({kind})",
            dataset_config=f.subset,
            dataset_split=f.split,
            metric_type=o.metric.split(",")[0],
            metric_name=metric_name(o.metric),
            metric_value=round(per[o.name], 6),
        ))
    return results


def card_data(run: RunFiles, model_name: str, license: str | None, facts: dict[str, TaskFacts]) -> ModelCardData:
    config = run.config
    base_models = _base_models(run)
    return ModelCardData(
        model_name=model_name,
        base_model=base_models or None,
        base_model_relation="merge" if base_models else None,  # a relation to nothing on the Hub means nothing
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=["merge", "mergekit", PROJECT, config.merge_method, run.evolve.sampler],
        eval_results=_eval_results(run, facts),
    )


def objective_md(run: RunFiles) -> str:
    """The objective in words, e.g. ``the mean of accuracy on `a` and accuracy on `b```; weights and signs shown."""
    objectives = run.evolve.objectives
    equal = len({o.weight for o in objectives}) == 1
    terms = [
        f"{'minus ' if o.goal == 'minimize' else ''}{'' if equal else f'{o.weight:g} × '}"
        f"{metric_name(o.metric)} on `{o.scored_on}`"
        for o in objectives
    ]
    if len(terms) == 1:
        return terms[0]
    listed = ", ".join(terms[:-1]) + f" and {terms[-1]}"
    return f"the {'mean' if equal else 'weighted mean'} of {listed}"


def _merged(run: RunFiles) -> tuple[str | None, list[str]]:
    base = str(run.config.base_model) if run.config.base_model is not None else None
    return base, [m for m in run.sources if m != base]


def _intro(run: RunFiles) -> str:
    report = run.report
    base, merged = _merged(run)
    onto = f" onto {run.names.name(base)}" if base else ""
    best_source = max(report["sources"].items(), key=lambda kv: kv[1]["heldout"], default=None)
    text = (
        f"A `{run.config.merge_method}` merge of {len(merged)} models{onto}, found by an evolutionary search with "
        f"{PROJECT}: an Optuna `{run.evolve.sampler}` sampler proposed {report['trials']} candidate mergekit "
        f"configurations, each was merged and scored {_scorer(run)}on {objective_md(run)}, and this model is the best "
        f"(trial {report['winner']['trial']})."
    )
    if run.stage:
        text += f" It is stage `{run.stage}` of a staged recipe; the Lineage section shows what earlier stages made."
    if best_source:
        name, row = best_source
        text += (
            f" On held-out data it scores {report['winner']['heldout']:.4f} (the objective above) "
            f"against {row['heldout']:.4f} for the best source model, {run.names.name(name)}."
        )
    return text


def _merge_md(run: RunFiles) -> str:
    config = run.config
    base, merged = _merged(run)
    lines = [f"Method: {method_md(config.merge_method)}, dtype `{config.dtype or 'as the sources'}`."]
    if base is not None:
        lines.append(f"Base model: {_model_md(run, base)}.")
    lines += ["", "Models merged:", ""]
    lines += [f"- {_model_md(run, m)}" for m in merged]
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
        header += ["objective (search)", "objective (held-out)"]
    for o in objectives:
        header += [f"{o.scored_on} {metric_name(o.metric)} (search)",
                   f"{o.heldout_scored_on} {metric_name(o.metric)} (held-out)"]

    def row(label: str, entry: dict[str, Any]) -> str:
        cells = [label]
        if weighted:
            cells += [f"{entry['search']:.4f}", f"{entry['heldout']:.4f}"]
        for o in objectives:
            cells += [f"{entry['per_objective'][split][o.name]:.4f}" for split in ("search", "heldout")]
        return "| " + " | ".join(cells) + " |"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append(row("**this merge**", report["winner"]))
    lines += [row(run.names.name(name), entry) for name, entry in report["sources"].items()]
    notes = [(
        "The search columns score the examples the search selected on: the winner is the best of "
        f"{report['trials']} trials there, so they overstate it. The held-out columns score examples the search "
        "never saw; they are the ones to quote."
    )]
    same = [o.scored_on for o in objectives if not o.separate_heldout]
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
        f"Sampler `{ev.sampler}` (seed {ev.seed}"
        f"{', options ' + json.dumps(ev.sampler_options.given()) if ev.sampler_options.given() else ''}), "
        f"{run.report['trials']} trials in study `{run.report.get('study', run.name)}`. Objectives:",
        "",
    ]
    for o in ev.objectives:
        limit = f", limit {o.limit}" if o.limit is not None else ""
        lines.append(f"- {metric_name(o.metric)} on `{o.scored_on}` ({o.goal}, weight {o.weight:g}{limit})")
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
                found_by += (f" (trial {winner['trial']}, search {winner['search']:.4f}, "
                             f"held-out {winner['heldout']:.4f})")
        lines.append(f"{'  ' * depth}- {run.names.name(model)}: a `{config.merge_method}` merge{found_by} of")
        for ref in map(str, config.referenced_models()):
            lines.append(f"{'  ' * (depth + 1)}- {_model_md(run, ref)}")
            walk(ref, depth + 2)

    for model in run.sources:
        walk(model, 0)
    return "\n".join(lines)


def _reproduce(run: RunFiles) -> str:
    """How to merge the config again: mergekit's own command unless the method is one this package adds, and
    only with the local sources in hand."""
    method = run.config.merge_method
    if method in register_plugins():
        command = (f"`mergekit-evolve merge mergekit_config.yml OUT` "
                   f"(`{method}` is a merge method {PROJECT} registers with mergekit)")
    else:
        command = "a plain `mergekit-yaml mergekit_config.yml OUT`"
    local = [run.names.name(m) for m in run.sources if run.names.is_local(m)]
    if local:
        return (
            f"{command} reproduces these weights once the source models it names are at hand: "
            f"{', '.join(f'`{m}`' for m in local)} are local folders (relative to the recipe), not on the Hub"
        )
    return f"{command} reproduces these weights"


def _evaluation_md(run: RunFiles, facts: dict[str, TaskFacts]) -> str:
    lm_eval = run.report.get("lm_eval")
    lines = [
        (f"Scored {_scored_with(run, lm_eval)}, on the search split during the search and once on the held-out split "
         "for the winner and each source."),
        "",
        "| objective | split | task | dataset | few-shot | examples |",
        "|---|---|---|---|---|---|",
    ]
    for o in run.evolve.objectives:
        for split, task, limit in (("search", o.scored_on, o.limit),
                                   ("held-out", o.heldout_scored_on, o.heldout_limit)):
            f = facts.get(task) or TaskFacts(task)
            if not isinstance(o, TaskObjective):
                data = _example_objective_md(o)
            elif f.dataset:
                data = f"[{f.dataset}](https://huggingface.co/datasets/{f.dataset})" + "".join(
                    f" `{x}`" for x in (f.subset, f.split) if x
                )
            else:
                data = "local data file of the task" + (f" (`{f.split}` split)" if f.split else "")
            shots = getattr(o, "num_fewshot", None)
            shots = shots if shots is not None else f.num_fewshot
            lines.append(f"| {metric_name(o.metric)} | {split} | `{task}` | {data} | {shots} | "
                         f"{limit if limit is not None else 'all'} |")
    return "\n".join(lines)


def _scorer(run: RunFiles) -> str:
    """``with lm-eval `` when every objective is an lm-eval task (others are scored by the recipe's code or models)."""
    return "with lm-eval " if all(isinstance(o, TaskObjective) for o in run.evolve.objectives) else ""


def _scored_with(run: RunFiles, lm_eval: str | None) -> str:
    tasks = (f"with lm-eval{f' {lm_eval}' if lm_eval else ''} "
             "(log-likelihood and generation requests as each task defines them)")
    kinds = [o for o in run.evolve.objectives if not isinstance(o, TaskObjective)]
    if not kinds:
        return tasks
    others = "example by example as the table says, each objective the mean over its examples"
    return others if len(kinds) == len(run.evolve.objectives) else f"{tasks}, and the other objectives {others}"


def _example_objective_md(o: Objective) -> str:
    """What scores an objective that is not an lm-eval task, for the evaluation table's data column."""
    if isinstance(o, RewardObjective):
        how = "sampled" if o.generation.do_sample else "greedy"
        return f"local prompts file; {how} answers scored by the reward model `{o.reward_model}`"
    if isinstance(o, JudgeObjective):
        how = "sampled" if o.generation.do_sample else "greedy"
        judge = f"the judge model `{o.judge_model}`" + (" (an OpenAI-compatible endpoint)" if o.remote else "")
        if o.mode == "pairwise":
            against = f"`{o.reference}`" if o.reference else "the base model (else the first model)"
            return (f"local prompts file; {how} answers compared with {against}'s by {judge} "
                    "in both orders, with the recipe's rubric (0.5: a tie)"
                    + (", the verdict read from its reply" if o.scoring == "parse" else ""))
        read = ", the rating read from its reply" if o.scoring == "parse" else ""
        return f"local prompts file; {how} answers rated by {judge} with the recipe's rubric{read}"
    return f"local JSONL file, scored by the recipe's function `{getattr(o, 'python', o.name)}`"


def _limitations_md(run: RunFiles) -> str:
    tasks = sorted({t for o in run.evolve.objectives for t in (o.scored_on, o.heldout_scored_on)})
    lines = [
        (f"- Measured only on {', '.join(f'`{t}`' for t in tasks)}: the search optimised for these and nothing "
         "else, so abilities they do not test may be better or worse than the sources'."),
        "- A merge inherits the limitations, biases and license terms of its source models; read their cards.",
        "- Not evaluated for safety, toxicity or factuality beyond the tasks above.",
    ]
    if any(not o.separate_heldout for o in run.evolve.objectives):
        lines.append("- Some held-out scores re-score the search task (no separate held-out task was given), "
                     "so they are not independent of the search.")
    return "\n".join(lines)


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


def build_card(run: RunFiles, repo_id: str | None = None, license: str | None = None) -> ModelCard:
    """The card for ``run``'s winner; ``repo_id`` (else the recipe's publish.repo) names it in the usage snippet,
    ``license`` (else the recipe's, else the sources' common one) goes into the front matter."""
    repo_id = repo_id or run.publish.repo
    model_name = repo_id.split("/")[1] if repo_id else run.name
    facts = _facts(run)
    return ModelCard.from_template(
        card_data(run, model_name, license or run.license()[0], facts),
        template_str=TEMPLATE,
        model_name=model_name,
        project=PROJECT,
        intro=_intro(run),
        merge=_merge_md(run),
        results=_results_md(run),
        evaluation=_evaluation_md(run, facts),
        search=_search_md(run),
        lineage=_lineage_md(run),
        usage=_usage_md(repo_id or str(run.best), _chat_template(run.best)),
        limitations=_limitations_md(run),
        reproduce=_reproduce(run),
        config_yaml=run.published_config().strip(),
        recipe_yaml=run.published_recipe().strip(),
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
