"""The evolve loop end to end on tiny models: study, resume, failures, bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
import torch
from click.testing import CliRunner
from tiny_models import write_copy_task
from transformers import AutoModelForCausalLM

from mergekit_evolve.cli import cli
from tests.recipe.test_bad_input import interruptible


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("ws")
    write_copy_task(root)
    return root


def recipe(workspace, tiny_llama, *, trials=3, sampler="random", extra_model="", end=None, task="tiny_copy", name="r"):
    base, v1, v2 = tiny_llama
    layer_end = end or 4
    text = textwrap.dedent(f"""
        merge_method: task_arithmetic
        base_model: {base}
        slices:
          - sources:
              - {{model: {base}, layer_range: [0, {layer_end}]}}
              - model: {v1}
                layer_range: [0, {layer_end}]
                parameters: {{weight: {{search: [0.0, 1.0]}}}}
              - model: {v2}{extra_model}
                layer_range: [0, {layer_end}]
                parameters: {{weight: {{search: [0.0, 1.0], points: 2}}}}
        dtype: float32
        evolve:
          allow_constant_objectives: true  # the tiny random models score 0 on tiny_copy
          sampler: {sampler}
          trials: {trials}
          seed: 3
          pruning: {{pruner: none}}
          objectives:
            - {{task: {task}, metric: "acc,none", heldout_task: tiny_copy_heldout}}
          task_paths: [tasks]
        """).lstrip()
    path = workspace / f"{name}.yml"
    path.write_text(text)
    return path


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args] + ["--no-progress"], catch_exceptions=False)


def load_study(run_dir, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")


@pytest.mark.slow
def test_run_writes_a_complete_run_folder(workspace, tiny_llama):
    path = recipe(workspace, tiny_llama, trials=3, sampler="tpe", name="full")
    run_dir = workspace / "runs" / "full"
    result = run_cli(path, "-o", run_dir)
    assert result.exit_code == 0, result.output
    # the databases were closed: no WAL left beside them, each file holds everything
    assert sorted(p.name for p in run_dir.glob("*.db*")) == ["examples.db", "study.db"]
    lines = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert [x["state"] for x in lines] == ["COMPLETE"] * 3
    assert all(x["config"].startswith("base_model:") and x["seconds"]["merge"] > 0 for x in lines)
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["sources"]) == {str(p) for p in tiny_llama}
    for row in [report["winner"], *report["sources"].values()]:
        assert 0.0 <= row["search"] <= 1.0 and 0.0 <= row["heldout"] <= 1.0
    assert (run_dir / "plots" / "history.png").stat().st_size > 1000
    best = run_dir / "best"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "mergekit_config.yml", "recipe.yml",
                 "README.md"):
        assert (best / name).exists(), name
    # best/ loads with plain transformers and holds the winner's weights (report's winner trial)
    study = load_study(run_dir, "full")
    assert study.best_trial.number == report["winner"]["trial"]
    model = AutoModelForCausalLM.from_pretrained(best)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (best / "mergekit_config.yml").read_text().strip() == study.best_trial.user_attrs["config"].strip()


@pytest.mark.slow
def test_interrupt_then_resume_keeps_finished_trials(workspace, tiny_llama):
    path = recipe(workspace, tiny_llama, trials=5000, name="resume")  # never finishes before the Ctrl-C
    run_dir = workspace / "runs" / "resume"
    cmd = [sys.executable, "-m", "mergekit_evolve", str(path), "-o", str(run_dir), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ},
                            preexec_fn=interruptible)
    deadline = time.time() + 120
    while time.time() < deadline:
        f = run_dir / "trials.jsonl"
        if f.exists() and len(f.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out.decode()
    assert b"resume" in out
    before = {t.number: t.params for t in load_study(run_dir, "resume").trials if t.state.name == "COMPLETE"}
    assert len(before) >= 3

    result = run_cli(path, "-o", run_dir, "--trials", len(before) + 2)
    assert result.exit_code == 0, result.output
    after = load_study(run_dir, "resume").trials
    complete = {t.number: t.params for t in after if t.state.name == "COMPLETE"}
    assert len(complete) == len(before) + 2
    assert all(complete[n] == p for n, p in before.items())  # kept, not repeated
    lines = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert len({x["number"] for x in lines}) == len(lines)  # each trial once


def test_a_searched_layer_range_past_the_models_depth_stops_before_search(workspace, tiny_llama):
    # layer_range ends above 4 do not exist in the 4-layer models: found before any weight loads
    path = recipe(workspace, tiny_llama, trials=4, name="fails", end="{search: [2, 7], type: int, name: end}")
    text = path.read_text().replace("layer_range: [0, {search: [2, 7], type: int, name: end}]",
                                    "layer_range: [0, {var: end}]")
    text = text.replace("{model: " + str(tiny_llama[0]) + ", layer_range: [0, {var: end}]}",
                        "{model: " + str(tiny_llama[0]) + ", layer_range: [0, {search: [2, 7], type: int, name: end}]}")
    path.write_text(text)
    run_dir = workspace / "runs" / "fails"
    result = run_cli(path, "-o", run_dir)
    assert result.exit_code == 1
    assert "fails.yml:5: layer_range of" in result.output and "searched end reaches 7" in result.output
    assert not run_dir.exists()


def test_missing_model_stops_before_search(workspace, tiny_llama):
    path = recipe(workspace, tiny_llama, name="missing")
    path.write_text(path.read_text().replace(str(tiny_llama[2]), str(workspace / "no-such-model")))
    run_dir = workspace / "runs" / "missing"
    result = run_cli(path, "-o", run_dir)
    assert result.exit_code == 1
    assert "no-such-model" in result.output and "not found" in result.output
    assert not run_dir.exists()


def test_unknown_task_stops_before_search(workspace, tiny_llama):
    path = recipe(workspace, tiny_llama, task="no_such_task", name="notask")
    result = run_cli(path, "-o", workspace / "runs" / "notask")
    assert result.exit_code == 1
    assert "no_such_task" in result.output
    assert not (workspace / "runs" / "notask").exists()


def test_other_runs_folder_is_not_overwritten(workspace, tiny_llama):
    run_dir = workspace / "runs" / "taken"
    run_dir.mkdir(parents=True)
    (run_dir / "precious.txt").write_text("keep me")
    result = run_cli(recipe(workspace, tiny_llama, name="taken"), "-o", run_dir)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (run_dir / "precious.txt").read_text() == "keep me"


def test_unwritable_run_folder(workspace, tiny_llama):
    blocker = workspace / "a-file"
    blocker.write_text("")
    result = run_cli(recipe(workspace, tiny_llama, name="unwritable"), "-o", blocker / "run")
    assert result.exit_code == 1 and "cannot write the run folder" in result.output


def test_trial_budget_counts_the_trials_other_workers_finish():
    from mergekit_evolve.study.search import FailureGuard, counted, optimize_until

    study = optuna.create_study(direction="maximize")
    ran = []

    def objective(trial):
        ran.append(trial.number)
        if len(ran) == 1:  # meanwhile another worker finishes three trials and prunes one
            for value in (0.1, 0.2, 0.3):
                study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))
            study.add_trial(optuna.trial.create_trial(params={}, distributions={},
                                                      state=optuna.trial.TrialState.PRUNED))
        if len(ran) == 2:
            raise optuna.TrialPruned()
        return 0.5

    optimize_until(study, objective, 5, FailureGuard(3), [])
    # pruned trials (this worker's and the other's) do not count toward the 5 completed
    assert len(ran) == 3 and counted(study) == 5 and len(study.trials) == 7


def test_a_ctrl_c_that_lands_in_a_finalizer_still_stops_the_search(monkeypatch, request):
    """The KeyboardInterrupt raised inside a ``__del__`` is dropped by Python; the press is not, and the
    dropped one is not printed (its "Exception ignored" traceback would break the one line of a Ctrl-C).
    Other errors in finalizers still reach the hook that was there before."""
    import gc
    import os
    import signal
    import sys

    from mergekit_evolve.study.search import FailureGuard, optimize_until

    class PressedWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100_000):  # the handler runs between these bytecodes, inside __del__
                pass

    class BrokenWhileCollected:
        def __del__(self):
            raise ValueError("a finalizer's own bug")

    printed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: printed.append(type(unraisable.exc_value)))
    # as in a terminal, even where the suite runs as a background job (which starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    study = optuna.create_study()
    ran = []

    def objective(trial):
        ran.append(trial.number)
        if len(ran) == 2:
            BrokenWhileCollected()
            PressedWhileCollected()
            gc.collect()
        return 0.5

    with pytest.raises(KeyboardInterrupt):
        optimize_until(study, objective, 50, FailureGuard(3), [])
    assert ran == [0, 1]  # stopped after the trial it was pressed in, which is kept
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert printed == [ValueError]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    assert sys.unraisablehook.__name__ == "<lambda>"  # restored


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_progress_shows_the_best_of_the_trials_just_counted(direction):
    from mergekit_evolve.study.search import Reached, best_text

    study = optuna.create_study(direction=direction)
    reached = Reached(10)
    assert best_text(study, reached.finished) == "no completed trial yet"
    for value in (0.3, 0.9, 0.1):
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, state=optuna.trial.TrialState.PRUNED))
    reached(study, study.trials[-1])
    best = study.best_trial
    assert best_text(study, reached.finished) == best_text(study) == f"best {best.value:.4f} (trial {best.number})"
    assert len(reached.finished) == 3  # `trials` counts completed trials, not pruned ones


def test_a_ctrl_c_that_a_library_wrapped_in_its_own_error_still_stops_the_search(monkeypatch):
    """pydantic turns a KeyboardInterrupt raised inside a serializer (mergekit's config dump) into a
    PydanticSerializationError: a plain Exception, which would fail only the trial and let the search go on."""
    from types import SimpleNamespace

    from mergekit_evolve.study import worker

    def wrapped(trial, space):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ValueError("Error calling function `serialize`: KeyboardInterrupt") from e

    monkeypatch.setattr(worker, "suggest_point", wrapped)
    trial = optuna.create_study().ask()
    stub = SimpleNamespace(recipe=SimpleNamespace(search_space=None))  # log_failure is never reached
    with pytest.raises(KeyboardInterrupt):
        worker.Worker.objective(stub, trial)
    assert trial.user_attrs["error"] == "interrupted"


def test_an_interrupted_trial_the_storage_finished_meanwhile_is_left_as_it_is(monkeypatch):
    """An interrupt can land after the storage committed a trial's end but before Optuna's frames knew it
    (CI saw Trial#4's "already finished" escape as a traceback): the trial keeps its state, the Ctrl-C its line."""
    import copy

    import mergekit_evolve.study.search as search

    study = optuna.create_study()
    trial = study.ask()
    storage = search.storage_of(study)
    running = copy.deepcopy(storage.get_trial(trial._trial_id))
    study.tell(trial, 0.5)
    monkeypatch.setattr(search, "trials_in_flight", lambda error: [trial._trial_id])
    monkeypatch.setattr(storage, "get_trial", lambda tid: running)  # what the interrupted read saw

    search._fail_in_flight(study, KeyboardInterrupt())
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE and "error" not in study.trials[0].user_attrs


def test_a_search_started_with_ctrl_c_ignored_keeps_ignoring_it(request):
    """A background job of a script starts with SIGINT ignored; Python leaves it so, and so does a search."""
    import signal

    from mergekit_evolve.study.search import CtrlC

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    with CtrlC():
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
