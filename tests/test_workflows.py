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
from test_parallel import write_recipe
from tiny_models import write_copy_task

REPO = Path(__file__).resolve().parent.parent
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
    calls = [m.group(1) for step in action["runs"]["steps"] for m in re.finditer(r"evolve-job\.sh\" (\w+)", step.get("run", ""))]
    assert calls == list(STEPS)
    upload = next(s for s in action["runs"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert "always()" in upload["if"]  # a failed or timed-out search still keeps its study for the next run


def test_evolve_workflow_passes_its_dispatch_inputs_to_the_action():
    workflow = load_yaml(REPO / ".github" / "workflows" / "evolve.yml")
    inputs = workflow["on"]["workflow_dispatch"]["inputs"]
    assert {"recipe", "trials", "publish"} <= set(inputs)
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
    write_copy_task(tmp_path)
    write_recipe(tmp_path, tiny_llama, "tiny", trials=2)
    env = {"RECIPE": "tiny.yml", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    first = {name: job(name, env, tmp_path) for name in ("names", "restore", "run")}
    for name, result in first.items():
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
    assert "nothing to restore" in first["restore"].stdout
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "report.json").exists()

    # the next dispatch: a fresh checkout gets the uploaded run folder back, and resumes its study
    checkout = tmp_path / "next"
    checkout.mkdir()
    for name in ("tiny.yml", "tasks", "data"):
        (shutil.copytree if (tmp_path / name).is_dir() else shutil.copy)(tmp_path / name, checkout / name)
    shutil.copytree(run_dir, checkout / "runs" / "tiny")  # what the artifact download writes
    again = {name: job(name, {**env, "TRIALS": "3"}, checkout) for name in ("restore", "run")}
    for name, result in again.items():
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
    assert "resuming it" in again["restore"].stdout
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{checkout / 'runs' / 'tiny' / 'study.db'}")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3
    before = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert all(complete[x["number"]].params == x["point"] for x in before)  # the first dispatch's trials, kept

    skipped = job("publish", env, checkout)
    assert skipped.returncode == 0 and "publishing not asked for" in skipped.stdout

    token = "hf_" + secrets.token_hex(16)
    hub = FakeHub({token: "alice"}).start()
    try:
        publish_env = {**env, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_ENDPOINT": hub.url,
                       "HF_TOKEN": token, "PUBLISH": "true", "PUBLISH_REPO": "alice/tiny-merge"}
        result = job("publish", publish_env, checkout)
        assert result.returncode == 0, result.stdout + result.stderr
        files = hub.repo("alice/tiny-merge").files
        assert files["model.safetensors"] == (checkout / "runs" / "tiny" / "best" / "model.safetensors").read_bytes()
        assert token not in result.stdout + result.stderr
    finally:
        hub.stop()
