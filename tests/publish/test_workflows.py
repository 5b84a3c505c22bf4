"""The GitHub Actions side: the workflows and the composite action call the job script's steps,
and those steps, run here in order, search, resume from a restored run folder, and publish."""

import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from hub_server import FakeHub
from test_card import build_run
from test_parallel import write_recipe
from tiny_models import write_copy_task

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / ".github" / "scripts" / "evolve-job.sh"
STEPS = ("names", "restore", "run", "publish")


def load_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=yaml.BaseLoader)  # BaseLoader: `on:` stays a string key


def job(step: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    # no GitHub variables from a CI runner's environment: restore must not reach for a real repository
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "GH_"))}
    return subprocess.run(["bash", str(SCRIPT), step], env={**base, **env}, cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def test_action_runs_every_step_of_the_job_script_in_order():
    action = load_yaml(REPO / "action.yml")
    calls = [m.group(1) for step in action["runs"]["steps"]
             for m in re.finditer(r"evolve-job\.sh\" (\w+)", step.get("run", ""))]
    assert calls == list(STEPS)
    upload = next(s for s in action["runs"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert "always()" in upload["if"]  # a failed or timed-out search still keeps its study for the next run
    assert "!${{ steps.names.outputs.run-dir }}/**/*.safetensors" in upload["with"]["path"].splitlines()  # no weights


def test_action_works_from_another_repository():
    setup = next(s for s in load_yaml(REPO / "action.yml")["runs"]["steps"]
                 if s.get("uses", "").startswith("actions/setup-python@"))
    # setup-python rejects a cache-dependency-path outside the caller's workspace, where the action's own files are
    assert "github.action_path" not in json.dumps(setup.get("with", {}))


def test_the_search_step_gets_what_a_publishing_recipe_checks_up_front():
    action = load_yaml(REPO / "action.yml")
    search = next(s for s in action["runs"]["steps"] if "evolve-job.sh\" run" in s.get("run", ""))
    assert search["env"]["HF_TOKEN"] == "${{ inputs.hf-token }}" and search["env"]["PUBLISH"] == "${{ inputs.publish }}"
    assert search["env"]["TIME_LIMIT"] == "${{ inputs.time-limit }}"


def test_evolve_workflow_leaves_time_for_the_upload():
    workflow = load_yaml(REPO / ".github" / "workflows" / "evolve.yml")
    job = workflow["jobs"]["evolve"]
    assert job["runs-on"] == "${{ inputs.runner }}"
    step = next(s for s in job["steps"] if s.get("uses") == "./")
    search_s, limit_s, job_s = (int(step["with"]["timeout"]), int(step["with"]["time-limit"]),
                                int(job["timeout-minutes"]) * 60)
    assert search_s < limit_s <= job_s - 20 * 60  # the winner after the last trial; the upload and the push after that
    torch = workflow["on"]["workflow_dispatch"]["inputs"]["torch"]
    assert torch["default"] == "cpu" and any(o.startswith("cu") for o in torch["options"])


def test_evolve_workflow_passes_its_dispatch_inputs_to_the_action():
    workflow = load_yaml(REPO / ".github" / "workflows" / "evolve.yml")
    inputs = workflow["on"]["workflow_dispatch"]["inputs"]
    assert {"recipe", "trials", "publish", "runner", "torch"} <= set(inputs)
    action_inputs = set(load_yaml(REPO / "action.yml")["inputs"])
    step = next(s for s in workflow["jobs"]["evolve"]["steps"] if s.get("uses") == "./")
    assert set(step["with"]) <= action_inputs
    assert step["with"]["hf-token"] == "${{ secrets.HF_TOKEN }}"
    assert workflow["permissions"]["actions"] == "read"  # restore lists and downloads artifacts


def test_ci_workflow_runs_the_ci_script_and_lints():
    workflow = load_yaml(REPO / ".github" / "workflows" / "ci.yml")
    runs = [s.get("run", "") for j in workflow["jobs"].values() for s in j["steps"]]
    assert "bash .ci/run" in runs and "bash .ci/lint-workflows.sh" in runs
    assert {"push", "pull_request"} <= set(workflow["on"])


def test_unknown_step_is_refused(tmp_path):
    result = job("deploy", {"RECIPE": "r.yml"}, tmp_path)
    assert result.returncode == 2 and "names|restore|run|publish" in result.stderr


def test_missing_recipe_is_named(tmp_path):
    result = job("run", {}, tmp_path)
    assert result.returncode != 0 and "set RECIPE to the recipe path" in result.stderr


def test_names_go_to_the_step_outputs(tmp_path):
    outputs = tmp_path / "github_output"
    result = job("names", {"RECIPE": "recipes/demo.yml", "GITHUB_OUTPUT": str(outputs)}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert outputs.read_text().splitlines() == ["run-dir=runs/demo", "artifact=evolve-demo"]


@pytest.mark.slow
def test_job_steps_search_resume_from_the_artifact_and_publish(tmp_path, tiny_llama):
    """Two dispatches of a recipe with a publish: section, as the action runs them, against a local Hub."""
    write_copy_task(tmp_path)
    recipe = write_recipe(tmp_path, tiny_llama, "tiny", trials=2)
    recipe.write_text(recipe.read_text() + "publish:\n  repo: alice/tiny-merge\n  license: mit\n")
    token = "hf_" + secrets.token_hex(16)
    hub = FakeHub({token: "alice"}).start()
    try:
        env = {"RECIPE": "tiny.yml", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_XET": "1",
               "HF_ENDPOINT": hub.url, "PUBLISH": "true", "HF_TOKEN": token}

        # a missing or refused secret stops the run step before any search
        for bad in ({"HF_TOKEN": ""}, {"HF_TOKEN": "hf_" + secrets.token_hex(16)}):
            refused = job("run", {**env, **bad}, tmp_path)
            assert refused.returncode == 1 and "secret HF_TOKEN" in refused.stderr, refused.stdout + refused.stderr
        assert not (tmp_path / "runs").exists()

        first = {name: job(name, env, tmp_path) for name in ("names", "restore", "run")}
        for name, result in first.items():
            assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        assert "nothing to restore" in first["restore"].stdout
        assert "HF_TOKEN belongs to alice" in first["run"].stdout
        assert not hub.repos  # the run step leaves the push to the publish step, after the artifact upload
        run_dir = tmp_path / "runs" / "tiny"
        assert (run_dir / "report.json").exists()

        # the next dispatch: a fresh checkout gets the uploaded run folder back (weights left out), and resumes
        checkout = tmp_path / "next"
        checkout.mkdir()
        for name in ("tiny.yml", "tasks", "data"):
            (shutil.copytree if (tmp_path / name).is_dir() else shutil.copy)(tmp_path / name, checkout / name)
        shutil.copytree(run_dir, checkout / "runs" / "tiny", ignore=shutil.ignore_patterns("*.safetensors"))
        quiet = {**env, "PUBLISH": "false", "TRIALS": "3"}
        again = {name: job(name, quiet, checkout) for name in ("restore", "run")}
        for name, result in again.items():
            assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        assert "resuming it" in again["restore"].stdout
        assert "not publishing to alice/tiny-merge" in again["run"].stderr  # said at the start, not after the search
        study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{checkout / 'runs' / 'tiny' / 'study.db'}")
        complete = [t for t in study.trials if t.state.name == "COMPLETE"]
        assert len(complete) == 3
        before = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
        assert all(complete[x["number"]].params == x["point"] for x in before)  # the first dispatch's trials, kept

        skipped = job("publish", quiet, checkout)
        assert skipped.returncode == 0 and "publishing not asked for" in skipped.stdout
        assert not hub.repos

        result = job("publish", env, checkout)  # the repo comes from the recipe's publish section
        assert result.returncode == 0, result.stdout + result.stderr
        files = hub.repo("alice/tiny-merge").files
        assert files["model.safetensors"] == (checkout / "runs" / "tiny" / "best" / "model.safetensors").read_bytes()
        everything = "".join(r.stdout + r.stderr for r in [*first.values(), *again.values(), result])
        assert token not in everything
    finally:
        hub.stop()


@pytest.mark.slow
def test_restore_merges_a_staged_recipes_earlier_winners_again(tmp_path, tiny_llama):
    """The artifact holds no weights; a later stage merges an earlier stage's winner, so restore rebuilds it."""
    run_dir = tmp_path / "runs" / "staged"
    stage = build_run(run_dir / "ps", tiny_llama)
    weights = (stage / "best" / "model.safetensors").read_bytes()
    (stage / "best" / "model.safetensors").unlink()  # as the artifact download leaves it
    card = (stage / "best" / "README.md").read_text()
    result = job("restore", {"RECIPE": "staged.yml"}, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "merging the winner in runs/staged/ps/best again" in result.stdout
    assert tensors((stage / "best" / "model.safetensors").read_bytes()) == tensors(weights)
    assert (stage / "best" / "README.md").read_text() == card  # only the weights were added
    again = job("restore", {"RECIPE": "staged.yml"}, tmp_path)
    assert "merging" not in again.stdout  # nothing missing, nothing merged


def tensors(data: bytes) -> dict:
    from safetensors.torch import load

    return {k: v.tolist() for k, v in load(data).items()}
