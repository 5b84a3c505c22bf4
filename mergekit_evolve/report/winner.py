"""After the search: the winner on disk as a Hugging Face model, the report, the history plot."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import optuna
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from mergekit_evolve.evaluate.scores import Scores
from mergekit_evolve.merge.layer_types import layer_types_fixed
from mergekit_evolve.methods.lora_particle import METHOD as LORA_PARTICLE
from mergekit_evolve.methods.lora_particle import particle_adapter, write_adapter
from mergekit_evolve.runfolder import BEST_ADAPTER_DIR, LORA_MERGES_PREFIX, RECIPE_FILE, RunFolder
from mergekit_evolve.study.worker import Worker

LOG = logging.getLogger(__name__)


def winner_config(trial: optuna.trial.FrozenTrial) -> MergeConfiguration:
    return MergeConfiguration.model_validate(yaml.safe_load(trial.user_attrs["config"]))


def write_best(
    run_dir: Path, recipe_file: Path, config: MergeConfiguration, options: MergeOptions, out: Path | None = None
) -> Path:
    """A plain mergekit merge of ``config``, written beside and then swapped in for ``out`` (default ``best/``);
    a LoRA particle (``lora_particle``) is also written as its PEFT adapter, in ``adapter/`` inside it."""
    target = out or RunFolder(run_dir).best
    staging = target.with_name(target.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    update: dict[str, Any] = {"copy_tokenizer": True, "write_model_card": True}
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=LORA_MERGES_PREFIX) as lora_cache:
        # base+adapter sources: mergekit's run_merge writes each merged copy first; keep those
        # only while best/ is written, unless the options name a cache for them
        if not options.lora_merge_cache:
            update["lora_merge_cache"] = lora_cache
        # run_merge normalises the config it is given in place; keep ours (and its YAML) as the user wrote it
        with layer_types_fixed():  # a routed path that changes the layer count of a layer_types family
            run_merge(config.model_copy(deep=True), str(staging), config_source=config.to_yaml(),
                      options=options.model_copy(update=update))
    shutil.copyfile(recipe_file, staging / RECIPE_FILE)
    if config.merge_method == LORA_PARTICLE:
        # the particle itself, to load over the base with PEFT (the merged model above is PEFT's merge of it)
        experts = [m for m in config.models or [] if m.model != config.base_model]
        adapter_config, factors = particle_adapter([m.model for m in experts],
                                                   [float(m.parameters["weight"]) for m in experts])
        # the base this particle was merged over, as the recipe names it (a publish swaps a local path for its name)
        adapter_config["base_model_name_or_path"] = config.base_model.model.path
        write_adapter(staging / BEST_ADAPTER_DIR, adapter_config, factors)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def source_scores(worker: Worker, dtype: str | None) -> dict[str, dict[str, Any]]:
    """Every source model on both splits, each scored once per run (see ``Worker.source_scores``)."""
    return {
        str(model): _summary(worker.source_scores(model, "search", dtype),
                             worker.source_scores(model, "heldout", dtype), worker)
        for model in worker.sources
    }


def search_scores(worker: Worker, best: optuna.trial.FrozenTrial) -> Scores:
    """The winner on the search split: the scores its trial stored when they cover the whole split
    (not anchor estimates); else scored now, its examples mostly reused from the run's store."""
    stored = best.user_attrs.get("scores") or {}
    if not worker.recipe.evolve.estimated and all(o.name in stored for o in worker.objectives):
        return Scores({o.name: stored[o.name] for o in worker.objectives})
    return worker.score_config(winner_config(best), "search")


def _summary(search: Scores, heldout: Scores, worker: Worker) -> dict[str, Any]:
    return {
        "search": search.weighted(worker.objectives),
        "heldout": heldout.weighted(worker.objectives),
        "per_objective": {"search": search.values, "heldout": heldout.values},
    }


def write_report(run_dir: Path, study: optuna.Study, worker: Worker, best: optuna.trial.FrozenTrial) -> dict[str, Any]:
    config = winner_config(best)
    winner = _summary(search_scores(worker, best), worker.score_config(config, "heldout"), worker)
    report = {
        "objective": " + ".join(f"{o.weight:g}*{o.name}" for o in worker.objectives),
        "winner": {**winner, "trial": best.number, "point": best.params},
        "sources": source_scores(worker, config.dtype),
        "trials": len(study.trials),
        "study": study.study_name,
        "lm_eval": version("lm_eval"),  # the model card states what scored it
    }
    RunFolder(run_dir).report.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def plot_history(
    run_dir: Path, study: optuna.Study, target: Callable[[optuna.trial.FrozenTrial], float] | None = None
) -> Path:
    """The weighted objective per trial; a multi-objective study passes ``target`` to compute it."""
    import matplotlib  # imported on use: pyplot must see the Agg backend before it loads (no display needed)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history

    out = RunFolder(run_dir).plots["history"]
    out.parent.mkdir(parents=True, exist_ok=True)
    ax = plot_optimization_history(study, target=target, target_name="weighted objective (search split)")
    ax.figure.set_size_inches(8, 4.5)
    ax.figure.tight_layout()
    ax.figure.savefig(out, dpi=110)
    plt.close(ax.figure)
    return out
