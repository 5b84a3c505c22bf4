"""Every mistake a user can make, through the command as a subprocess: one line naming the recipe
line and the model or file, the exit code, nothing recorded and nothing lost.

Mistakes found before the search create no run folder and load no weights (the command logs
"loaded ... into memory" for each source it loads); a subprocess costs ~7 s of imports, so the
default run keeps a few representative cases and marks the rest slow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import transformers
from tiny_models import CONFIGS, VOCAB, make_family, write_copy_task

from mergekit_evolve.commands.common import setup_logging
from mergekit_evolve.recipe.document import load_recipe
from mergekit_evolve.runfolder import RunDirError, RunFolder
from mergekit_evolve.study.search import FailureGuard

REPO = Path(__file__).resolve().parents[2]
LOADED = "into memory"  # logged for each source model loaded: a pre-search mistake shows none


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("bad")
    write_copy_task(root)
    make_family(root / "neox", "gpt_neox", variants=0)
    wide = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False)
    make_family(root / "wide", config=wide, variants=0)
    assert CONFIGS["llama"]().hidden_size != wide.hidden_size
    for name, damage in (("truncated", lambda b: b[:100]), ("random", lambda b: os.urandom(len(b)))):
        shutil.copytree(tiny_llama[2], root / name)
        weights = root / name / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
    shutil.copytree(tiny_llama[0], root / "notok")
    for f in (root / "notok").glob("tokenizer*"):
        f.unlink()
    return root


def recipe_text(tiny_llama, *, constant_ok: bool = True) -> str:
    base, v1, v2 = tiny_llama
    return textwrap.dedent(f"""\
        merge_method: task_arithmetic
        base_model: {base}
        slices:
          - sources:
              - {{model: {base}, layer_range: [0, 4]}}
              - model: {v1}
                layer_range: [0, 4]
                parameters: {{weight: {{search: [0.0, 1.0]}}}}
              - model: {v2}
                layer_range: [0, 4]
                parameters: {{weight: {{search: [0.0, 1.0]}}}}
        dtype: float32
        evolve:
          sampler: random
          trials: 2
          seed: 3
          allow_constant_objectives: {str(constant_ok).lower()}
          pruning: {{pruner: none}}
          objectives:
            - {{task: tiny_copy, metric: "acc,none", heldout_task: tiny_copy_heldout}}
          task_paths: [tasks]
        """)


def write(ws: Path, name: str, text: str) -> Path:
    path = ws / f"{name}.yml"
    path.write_text(text)
    return path


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "mergekit_evolve", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600, check=False)


def one_error(result: subprocess.CompletedProcess) -> str:
    """The single ``Error:`` line of a failed command, checking there is no traceback."""
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    return errors[0]


def line_of(path: Path, marker: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if marker in line)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# (case, what to replace in the recipe -> with what, the line it names (a marker on it), what the message says)
def cases(ws: Path, tiny_llama) -> dict[str, tuple[str, str, str, str]]:
    base, _, v2 = map(str, tiny_llama)
    return {
        "crimes": (v2, str(ws / "neox" / "base"), "neox", "evolve.allow_crimes"),
        "hidden_size": (v2, str(ws / "wide" / "base"), "wide", "shape [48]"),
        "layer_range": (f"{base}, layer_range: [0, 4]", f"{base}, layer_range: [0, 6]", "[0, 6]", "has 4 layers"),
        "searched_layer_end": ("parameters: {weight: {search: [0.0, 1.0]}}\n      - model",
                               "parameters: {weight: {search: [0.0, 1.0]}}\n"
                               "        layer_range: [0, {search: [2, 10], type: int}]\n      - model",
                               "[2, 10]", "searched end reaches 10"),
        "metric": ('metric: "acc,none"', 'metric: "f1,none"', "f1,none", "no metric 'f1'"),
        "filter": ('metric: "acc,none"', 'metric: "acc,strict"', "acc,strict", "no filter 'strict'"),
        "missing_model": (v2, str(ws / "no-such-model"), "no-such-model", "not found"),
        "unknown_task": ("{task: tiny_copy,", "{task: tiny_cpy,", "tiny_cpy", "tiny_cpy"),
        "no_base_model": (f"base_model: {base}\n", "", "merge_method", "needs a base_model"),
        "truncated_weights": (v2, str(ws / "truncated"), "truncated", f"{ws / 'truncated' / 'model.safetensors'}"),
        "random_weights": (v2, str(ws / "random"), "random", f"{ws / 'random' / 'model.safetensors'}"),
        "no_tokenizer": (base, str(ws / "notok"), "base_model", "no tokenizer"),
        "annotation_key": ("{search: [0.0, 1.0]}", "{search: [0.0, 1.0], foo: 1}", "foo", "'foo'"),
        "batch_size": ("  trials: 2\n", "  trials: 2\n  batch_size: [64]\n", "batch_size", "evolve.batch_size: Input"),
    }


FAST = {("crimes", "run"), ("truncated_weights", "run"), ("metric", "dry-run")}
CASES = ["crimes", "hidden_size", "layer_range", "searched_layer_end", "metric", "filter", "missing_model",
         "unknown_task", "no_base_model", "truncated_weights", "random_weights", "no_tokenizer", "annotation_key",
         "batch_size"]


@pytest.mark.parametrize(("case", "mode"), [
    pytest.param(case, mode, marks=() if (case, mode) in FAST else pytest.mark.slow)
    for case in CASES for mode in ("dry-run", "run")
])
def test_mistake_is_one_line_before_anything_loads(ws, tiny_llama, case, mode):
    old, new, marker, says = cases(ws, tiny_llama)[case]
    text = recipe_text(tiny_llama)
    assert old in text
    path = write(ws, f"{case}-{mode}", text.replace(old, new, 1))
    run_dir = ws / "runs" / f"{case}-{mode}"
    result = cli(path, "-o", run_dir, *(["--dry-run"] if mode == "dry-run" else []), cwd=ws)
    assert result.returncode == 1, result.stdout + result.stderr
    error = one_error(result)
    assert f"{path.name}:{line_of(path, marker)}:" in error and says in error, error
    assert LOADED not in result.stderr  # found before any weight was read
    assert not run_dir.exists()  # nothing created, so no trial recorded


@pytest.mark.parametrize("value", ["-5", pytest.param("0", marks=pytest.mark.slow)])
def test_trials_must_be_positive(ws, tiny_llama, value):
    run_dir = ws / "runs" / f"trials{value}"
    result = cli(write(ws, "trials", recipe_text(tiny_llama)), "-o", run_dir, "--trials", value, cwd=ws)
    assert result.returncode == 2 and "Invalid value for '--trials'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not run_dir.exists()


def test_a_held_run_folder_is_refused_naming_its_holder(ws, tiny_llama):
    run_dir = ws / "runs" / "held"
    run_dir.mkdir(parents=True)
    (run_dir / "precious.txt").write_text("keep me")
    (run_dir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "now"}))
    before = snapshot(run_dir)
    result = cli(write(ws, "held", recipe_text(tiny_llama)), "-o", run_dir, cwd=ws)
    assert result.returncode == 1
    error = one_error(result)
    assert f"process {os.getpid()} on {socket.gethostname()}" in error and "run.lock" in error
    assert snapshot(run_dir) == before and LOADED not in result.stderr


def test_run_folders_of_earlier_versions_still_resume(ws, tiny_llama):
    recipe = load_recipe(write(ws, "earlier", recipe_text(tiny_llama)))
    folder = RunFolder(ws / "runs" / "earlier")
    folder.path.mkdir(parents=True)
    folder.run_file.write_text(json.dumps({"fingerprint": recipe.earlier_fingerprint()}))
    folder.check(recipe.fingerprints())
    with pytest.raises(RunDirError, match="different recipe"):
        folder.check(recipe.fingerprint() + "x")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_lock_refuses_a_live_holder_and_replaces_a_dead_one(tmp_path, caplog):
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        holder = json.loads(folder.lock_file.read_text())
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(RunDirError, match=f"in use by process {os.getpid()}"), folder.lock():
            pass
    assert not folder.lock_file.exists()
    folder.lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    with caplog.at_level(logging.WARNING), folder.lock():
        assert json.loads(folder.lock_file.read_text())["pid"] == os.getpid()
    assert "has ended" in caplog.text
    other = {"host": "another-host", "pid": 1}  # another host's process cannot be checked: never taken over
    folder.lock_file.write_text(json.dumps(other))
    with pytest.raises(RunDirError, match="another-host"), folder.lock():
        pass


@pytest.mark.parametrize(("verbose", "shown"), [(0, False), (1, True)])
def test_failed_trials_tracebacks_show_with_v(verbose, shown):
    setup_logging(verbose)
    assert logging.getLogger("mergekit_evolve.tracebacks").isEnabledFor(logging.INFO) is shown
    assert not logging.getLogger("optuna").isEnabledFor(logging.WARNING)  # its per-trial tracebacks


@pytest.mark.parametrize(("verbose", "shown"), [(0, False), (1, True)])
def test_a_library_logging_an_exception_is_one_line_without_v(verbose, shown, capsys):
    setup_logging(verbose)
    try:
        raise RuntimeError("Cannot operate on a closed database.")
    except RuntimeError:  # as SQLAlchemy's pool logs a cursor it cannot close after a Ctrl-C
        logging.getLogger("sqlalchemy.pool.impl").error("Error closing cursor", exc_info=True)
    err = capsys.readouterr().err
    assert "Error closing cursor: RuntimeError: Cannot operate on a closed database." in " ".join(err.split()) or shown
    assert ("Traceback" in err) is shown


def failed(error: str | None) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"error": error} if error else {})


class _Study:
    stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_the_same_error_twice_stops_other_errors_do_not(tmp_path):
    guard = FailureGuard(limit=20)
    study = _Study()
    guard(study, failed("ValueError: a"))
    guard(study, failed("ValueError: b"))
    guard(study, failed("OutOfMemoryError: CUDA"))
    guard(study, failed("OutOfMemoryError: CUDA"))  # may pass: not "the same deterministic error"
    guard(study, failed(None))  # a lost worker
    guard(study, failed(None))
    assert not guard.tripped and not study.stopped
    guard(study, failed("ValueError: c"))
    guard(study, failed("ValueError: c"))
    assert guard.tripped and study.stopped
    with pytest.raises(Exception, match="failed with the same error.*ValueError: c.*failures.log"):
        guard.check(tmp_path)


# --- after loading: the start point, constant objectives, failing trials, resumes ------------------


def fail_recipe(tiny_llama, choice: str, end: int = 2, init: str = "") -> str:
    _, v1, v2 = tiny_llama
    # a layer_range that starts at 3 but ends at 2 cannot be merged: those candidates fail in mergekit
    return textwrap.dedent(f"""\
        merge_method: linear
        slices:
          - sources:
              - {{model: {v1}, layer_range: [{{choice: {choice}{init}, name: start}}, {end}], parameters: {{weight: 0.5}}}}
              - {{model: {v2}, layer_range: [{{var: start}}, {end}], parameters: {{weight: 0.5}}}}
        dtype: float32
        evolve:
          sampler: random
          allow_constant_objectives: true
          trials: 4
          seed: 1
          objectives:
            - {{task: tiny_copy, metric: "acc,none", heldout_task: tiny_copy_heldout}}
          task_paths: [tasks]
        """)  # noqa: E501


@pytest.mark.slow
def test_a_start_point_that_fails_stops_before_any_trial(ws, tiny_llama):
    path = write(ws, "startpoint", fail_recipe(tiny_llama, "[0, 3]", init=", init: 3"))
    run_dir = ws / "runs" / "startpoint"
    result = cli(path, "-o", run_dir, cwd=ws)
    assert result.returncode == 1
    assert "start point fails before any trial" in one_error(result)
    assert not run_dir.exists()


@pytest.mark.slow
def test_an_objective_every_source_scores_zero_on_stops_the_run(ws, tiny_llama):
    path = write(ws, "constant", recipe_text(tiny_llama, constant_ok=False))
    run_dir = ws / "runs" / "constant"
    result = cli(path, "-o", run_dir, cwd=ws)
    assert result.returncode == 1
    error = one_error(result)
    assert f"constant.yml:{line_of(path, 'task: tiny_copy')}:" in error
    assert "every source model scores 0 on tiny_copy/acc,none" in error and "leading space" in error
    assert not (run_dir / "study.db").exists() and not (run_dir / "trials.jsonl").exists()  # no trial recorded


@pytest.mark.slow
def test_the_same_failure_twice_stops_and_a_fixed_recipe_resumes(ws, tiny_llama):
    # seed 1 draws start 3 for the first two trials: both fail the same way, none completes
    path = write(ws, "fails", fail_recipe(tiny_llama, "[0, 3]"))
    run_dir = ws / "runs" / "fails"
    result = cli(path, "-o", run_dir, cwd=ws)
    assert result.returncode == 1
    error = one_error(result)
    assert "failed with the same error" in error and "failures.log" in error
    assert [line for line in result.stderr.splitlines() if "trial" in line and "failed:" in line]  # one line each
    assert "Traceback" in (run_dir / "failures.log").read_text()
    states = [json.loads(x)["state"] for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert states == ["FAIL", "FAIL"]
    # the fix keeps the search space (start in {0, 3}): the run resumes, with a warning
    path.write_text(fail_recipe(tiny_llama, "[0, 3]", end=4))
    result = cli(path, "-o", run_dir, cwd=ws)
    assert result.returncode == 0, result.stderr
    states = [json.loads(x)["state"] for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert states[:2] == ["FAIL", "FAIL"] and states.count("COMPLETE") == 4


@pytest.mark.slow
def test_a_changed_task_or_model_is_refused_and_the_run_folder_kept(ws, tiny_llama):
    shutil.copytree(ws / "tasks", ws / "tasks2")
    path = write(ws, "changed", recipe_text(tiny_llama).replace("task_paths: [tasks]", "task_paths: [tasks2]"))
    run_dir = ws / "runs" / "changed"
    assert cli(path, "-o", run_dir, cwd=ws).returncode == 0
    before = snapshot(run_dir)
    yaml = ws / "tasks2" / "tiny_copy.yaml"
    yaml.write_text(yaml.read_text().replace('doc_to_target: "{{answer}}"', 'doc_to_target: " {{answer}}"'))
    result = cli(path, "-o", run_dir, cwd=ws)
    assert result.returncode == 1
    error = one_error(result)
    assert str(yaml) in error and "--overwrite" in error
    yaml.write_text(yaml.read_text().replace('doc_to_target: " {{answer}}"', 'doc_to_target: "{{answer}}"'))
    # a mistake outside the search space (a model's name is part of its dimensions' names)
    path.write_text(path.read_text().replace(f"{tiny_llama[0]}, layer_range: [0, 4]",
                                             f"{tiny_llama[0]}, layer_range: [0, 6]"))
    result = cli(path, "-o", run_dir, cwd=ws)
    assert result.returncode == 1 and "has 4 layers" in one_error(result)
    assert snapshot(run_dir) == before  # nothing lost, nothing added


def interruptible() -> None:
    """A child's Ctrl-C as in a terminal: where the suite runs as a background job it would start ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_stop(ws: Path, path: Path, run_dir: Path, sig: signal.Signals) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "mergekit_evolve", str(path), "-o", str(run_dir), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ws,
                            preexec_fn=interruptible)
    trials = run_dir / "trials.jsonl"
    while not (trials.exists() and len(trials.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def load(run_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_the_running_trial_fails_as_interrupted(ws, tiny_llama):
    path = write(ws, "ctrlc", recipe_text(tiny_llama).replace("trials: 2", "trials: 5000"))
    run_dir = ws / "runs" / "ctrlc"
    result = start_and_stop(ws, path, run_dir, signal.SIGINT)
    assert result.returncode == 130
    out = result.stdout + result.stderr
    assert "Traceback" not in out and "KeyboardInterrupt" not in out and "interrupted" in out
    last = load(run_dir, "ctrlc").trials[-1]
    assert last.state != optuna.trial.TrialState.RUNNING
    if last.state == optuna.trial.TrialState.FAIL:
        assert last.user_attrs["error"] == "interrupted"
    assert not (run_dir / "run.lock").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_failing_and_requeueing_its_running_trial(ws, tiny_llama):
    path = write(ws, "killed", recipe_text(tiny_llama).replace("trials: 2", "trials: 5000"))
    run_dir = ws / "runs" / "killed"
    result = start_and_stop(ws, path, run_dir, signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL and (run_dir / "run.lock").exists()
    running = [t for t in load(run_dir, "killed").trials if t.state == optuna.trial.TrialState.RUNNING]
    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in load(run_dir, "killed").trials)
    result = cli(path, "-o", run_dir, "--trials", done + 1, cwd=ws)
    assert result.returncode == 0, result.stderr
    trials = load(run_dir, "killed").trials
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    for lost in running:
        assert trials[lost.number].state == optuna.trial.TrialState.FAIL
        # its point ran again (to the end, or to where the pruner stopped it); a kill in the middle of
        # suggesting leaves part of a point, which the retry keeps and completes
        again = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        assert any(lost.params.items() <= t.params.items() and t.state in again for t in trials[lost.number + 1:])
    assert not (run_dir / "run.lock").exists()
