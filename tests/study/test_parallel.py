"""Several workers on one study: worker plans, seeds, lost trials, storage URLs, and --workers end to end."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState
from tiny_models import write_copy_task

from mergekit_evolve.cli import cli
from mergekit_evolve.recipe.evolve_settings import EvolveSettings
from mergekit_evolve.study.jobs import ParallelError, plan_workers
from mergekit_evolve.study.storage import WORKER_KEY, StorageError, check_storage, open_storage, reap, register_worker


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("parallel")
    # enough examples that a trial outlasts a spawned worker's start-up several times over
    write_copy_task(root, n_search=96)
    return root


def write_recipe(folder: Path, models: list[Path], name: str, *, trials: int, sampler: str = "random",
                 method: str = "task_arithmetic", grace: int = 120) -> Path:
    """A two-weight task-arithmetic search over the tiny llama family, scored on the tiny copy task."""
    base, v1, v2 = models
    path = folder / f"{name}.yml"
    path.write_text(textwrap.dedent(f"""
        merge_method: {method}
        base_model: {base}
        models:
          - model: {base}
          - model: {v1}
            parameters: {{weight: {{search: [0.0, 1.0]}}}}
          - model: {v2}
            parameters: {{weight: {{search: [0.0, 1.0]}}}}
        dtype: float32
        evolve:
          allow_constant_objectives: true  # the tiny random models score 0 on tiny_copy
          sampler: {sampler}
          trials: {trials}
          seed: 1
          heartbeat_grace: {grace}
          objectives:
            - {{task: tiny_copy, metric: "acc,none", heldout_task: tiny_copy_heldout}}
          task_paths: [tasks]
        """).lstrip())
    return path


def settings(**kw) -> EvolveSettings:
    return EvolveSettings(objectives=[{"task": "t"}], **kw)


def finished(study: optuna.Study, state: TrialState) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state == state]


# --- fast ----------------------------------------------------------------------------------


def test_worker_plan_prefers_the_command_line():
    assert plan_workers(settings(workers=3), None).count == 3
    assert not plan_workers(settings(), None).parallel
    assert plan_workers(settings(), "auto").parallel  # Ray with one actor is still a Ray run


def test_ray_option_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ParallelError, match=r"pip install 'mergekit-evolve\[ray\]'"):
        plan_workers(settings(), "auto")


def test_each_worker_that_joins_a_study_gets_its_own_index(tmp_path):
    study = optuna.create_study(storage=open_storage(f"journal:{tmp_path / 'j.log'}"), study_name="s")
    assert [register_worker(study) for _ in range(3)] == [0, 1, 2]
    # another process opening the same storage continues the count
    again = optuna.load_study(study_name="s", storage=open_storage(f"journal:{tmp_path / 'j.log'}"))
    assert register_worker(again) == 3


def test_reaping_a_dead_worker_fails_its_trial_and_requeues_the_point(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    mine, other = study.ask(), study.ask()
    for trial, name in ((mine, "host:1"), (other, "host:2")):
        trial.suggest_float("w", 0, 1)
        trial.set_user_attr(WORKER_KEY, name)
    assert reap(study, "host:1", "was killed (SIGKILL)") == [mine.number]
    trials = {t.number: t for t in study.get_trials()}
    assert trials[mine.number].state == TrialState.FAIL
    assert trials[other.number].state == TrialState.RUNNING  # a live worker's trial is left alone
    retry = [t for t in trials.values() if t.state == TrialState.WAITING]
    assert len(retry) == 1 and retry[0].params == trials[mine.number].params
    assert retry[0].system_attrs["failed_trial"] == mine.number


def test_journal_storage_fails_a_trial_whose_heartbeat_stopped(tmp_path):
    storage = open_storage(f"journal:{tmp_path / 'j.log'}", grace_seconds=1)
    study = optuna.create_study(storage=storage)
    trial = study.ask()
    trial.suggest_float("w", 0, 1)
    storage.record_heartbeat(trial._trial_id)  # what Optuna's heartbeat thread does while a trial runs
    fresh = study.ask()  # no heartbeat yet: never stale (as with RDB storages)
    optuna.storages.fail_stale_trials(study)
    assert study.trials[trial.number].state == TrialState.RUNNING
    time.sleep(1.3)
    optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.trials}
    assert states[trial.number] == TrialState.FAIL and states[fresh.number] == TrialState.RUNNING
    retried = [t for t in study.trials if t.state == TrialState.WAITING]
    assert [t.params for t in retried] == [{"w": trial.params["w"]}]


def test_retried_trial_is_not_stale_from_its_inherited_heartbeat(tmp_path):
    storage = open_storage(f"journal:{tmp_path / 'j.log'}", grace_seconds=1)
    study = optuna.create_study(storage=storage)
    first = study.ask()
    first.suggest_float("w", 0, 1)
    storage.record_heartbeat(first._trial_id)
    time.sleep(1.2)
    optuna.storages.fail_stale_trials(study)
    retry = study.ask()  # pops the re-queued point, with the old trial's system attrs
    assert retry.number != first.number and retry.params == first.params
    optuna.storages.fail_stale_trials(study)
    assert study.trials[retry.number].state == TrialState.RUNNING


@pytest.mark.parametrize("url, expected", [
    ("journal:/no/such/folder/study.log", "/no/such/folder/study.log"),
    ("nosuchdb://host/x", "nosuchdb://host/x"),
])
def test_unusable_storage_url_is_named(url, expected):
    with pytest.raises(StorageError, match="cannot open the study storage") as e:
        check_storage(url)
    assert expected in str(e.value)


def test_missing_database_driver_says_what_to_install(monkeypatch):
    for driver in ("psycopg", "psycopg2"):
        monkeypatch.setitem(sys.modules, driver, None)  # import -> ImportError, whatever this machine has
    with pytest.raises(StorageError, match=r"pip install 'psycopg\[binary\]'"):
        check_storage("postgresql://evolve@127.0.0.1:1/evolve")


def test_unusable_storage_stops_the_run_before_the_run_folder(workspace, tiny_llama):
    path = write_recipe(workspace, tiny_llama, "badstore", trials=2)
    run_dir = workspace / "runs" / "badstore"
    result = CliRunner().invoke(cli, [str(path), "-o", str(run_dir), "--storage", "journal:/no/such/folder/x.log",
                                      "--no-progress"])
    assert result.exit_code == 1
    assert "cannot open the study storage 'journal:/no/such/folder/x.log'" in result.output
    assert not run_dir.exists()


# --- end to end ----------------------------------------------------------------------------


def load(run_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")


@pytest.mark.slow
def test_two_workers_share_one_study(workspace, tiny_llama):
    path = write_recipe(workspace, tiny_llama, "two", trials=16)
    run_dir = workspace / "runs" / "two"
    result = CliRunner().invoke(cli, [str(path), "-o", str(run_dir), "--workers", "2", "--no-progress"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = load(run_dir, "two")
    done = finished(study, TrialState.COMPLETE)
    assert 16 <= len(done) <= 17  # the other worker may finish the trial it had started
    assert len({t.user_attrs[WORKER_KEY] for t in done}) == 2  # both processes searched
    points = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(points)) == len(points)  # distinct sampler seeds: no point proposed twice
    lines = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert sorted(x["number"] for x in lines) == sorted(t.number for t in study.trials if t.state.is_finished())
    assert json.loads((run_dir / "report.json").read_text())["winner"]["trial"] in {t.number for t in done}


def wait_for(condition, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_killed_worker_loses_only_its_trial_and_a_restart_resumes(workspace, tiny_llama):
    path = write_recipe(workspace, tiny_llama, "kill", trials=20)
    run_dir = workspace / "runs" / "kill"
    cmd = [sys.executable, "-m", "mergekit_evolve", str(path), "-o", str(run_dir), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def child_trial():
        if not (run_dir / "study.db").exists():
            return None
        try:
            running = load(run_dir, "kill").get_trials(states=(TrialState.RUNNING,))
        except (KeyError, Exception):  # the study may not exist yet
            return None
        # a child's trial that has its point already (the kill then lands mid-trial, not before the sampler ran)
        return next((t for t in running if t.params
                     and not t.user_attrs.get(WORKER_KEY, f":{proc.pid}").endswith(f":{proc.pid}")), None)

    def stopped_mid_trial():
        victim = child_trial()
        if victim is None:
            return None
        pid = int(victim.user_attrs[WORKER_KEY].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGSTOP)  # frozen, so the trial cannot finish between this look and the kill
        if load(run_dir, "kill").trials[victim.number].state == TrialState.RUNNING:
            return victim, pid
        os.kill(pid, signal.SIGCONT)  # it finished in the meantime: try the next one
        return None

    victim, pid = wait_for(stopped_mid_trial, 180, "the second worker to start a trial")
    os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()
    assert b"was killed (SIGKILL)" in out

    study = load(run_dir, "kill")
    trials = {t.number: t for t in study.trials}
    assert trials[victim.number].state == TrialState.FAIL  # failed at once, not after the grace period
    assert not [t for t in trials.values() if t.state == TrialState.RUNNING]
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == trials[victim.number].params == victim.params
    done = {n: t.params for n, t in trials.items() if t.state == TrialState.COMPLETE}
    assert len(done) >= 20

    # a restart resumes the same study: earlier trials are kept, two more are added
    result = CliRunner().invoke(cli, [str(path), "-o", str(run_dir), "--trials", str(len(done) + 2), "--workers", "2",
                                      "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    after = {t.number: t.params for t in load(run_dir, "kill").trials if t.state == TrialState.COMPLETE}
    assert len(after) >= len(done) + 2 and all(after[n] == p for n, p in done.items())


@pytest.mark.slow
def test_a_recipe_whose_candidates_all_fail_stops_every_worker(workspace, tiny_llama):
    base, v1, _ = tiny_llama
    path = workspace / "broken.yml"  # a layer range starting at 3 but ending at 2: half the candidates fail in mergekit
    path.write_text(textwrap.dedent(f"""
        merge_method: linear
        slices:
          - sources:
              - {{model: {base}, layer_range: [{{choice: [0, 3], name: start}}, 2], parameters: {{weight: 0.5}}}}
              - {{model: {v1}, layer_range: [{{var: start}}, 2], parameters: {{weight: 0.5}}}}
        dtype: float32
        evolve:
          allow_constant_objectives: true  # the tiny random models score 0 on tiny_copy
          sampler: random
          trials: 20
          max_failures: 3
          objectives:
            - {{task: tiny_copy, metric: "acc,none"}}
          task_paths: [tasks]
        """).lstrip())
    run_dir = workspace / "runs" / "broken"
    result = CliRunner().invoke(cli, [str(path), "-o", str(run_dir), "--workers", "2", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "failed with the same error" in result.output and "failures.log" in result.output
    study = load(run_dir, "broken")
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert len(study.get_trials(states=(TrialState.FAIL,))) < 20  # stopped early, not after the whole budget
