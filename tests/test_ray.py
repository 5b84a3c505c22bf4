"""Workers as Ray actors: how many and with what resources, and a short search through a local Ray runtime."""

import json
import os

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from mergekit_evolve.cli import cli
from mergekit_evolve.study.ray_actors import plan_actors
from mergekit_evolve.study.storage import WORKER_KEY
from test_parallel import write_recipe
from tiny_models import write_copy_task


@pytest.mark.parametrize("resources, requested, expected", [
    ({"CPU": 8.0}, 3, (3, {"num_cpus": 1})),                # no GPU: the requested number of CPU actors
    ({"CPU": 8.0, "GPU": 4.0}, 1, (4, {"num_gpus": 1})),    # GPUs: one actor per GPU by default
    ({"CPU": 8.0, "GPU": 4.0}, 2, (2, {"num_gpus": 1})),    # ... or as many as asked for, when fewer
    ({"CPU": 8.0, "GPU": 2.0}, 6, (2, {"num_gpus": 1})),    # never more actors than GPUs
])
def test_actor_plan(resources, requested, expected):
    assert plan_actors(resources, requested) == expected


@pytest.mark.slow
def test_search_through_a_local_ray_runtime(tmp_path, tiny_llama):
    write_copy_task(tmp_path, n_search=96)
    # a merge method of this package: the actors can merge it only if they registered the plugins
    path = write_recipe(tmp_path, tiny_llama, "viaray", trials=8, method="gaussian_mutation")
    run_dir = tmp_path / "runs" / "viaray"
    # "local" starts a private Ray runtime (never joins one another process started on this machine)
    result = CliRunner().invoke(cli, [str(path), "-o", str(run_dir), "--ray", "local", "--workers", "2", "--no-progress"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="viaray", storage=f"sqlite:///{run_dir / 'study.db'}")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert 8 <= len(done) <= 9
    workers = {t.user_attrs[WORKER_KEY] for t in done}
    assert len(workers) == 2 and not any(w.endswith(f":{os.getpid()}") for w in workers)  # actors, not the driver
    lines = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert len(lines) == len({x["number"] for x in lines}) == len(study.trials)
    assert (run_dir / "best" / "model.safetensors").exists()
