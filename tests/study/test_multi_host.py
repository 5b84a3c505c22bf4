"""Two mergekit-evolve processes, each with its own run folder, sharing one study storage.

This is the several-hosts setup (there with PostgreSQL, or a journal file on a shared file
system) on one machine: the processes share the search without repeating trials, the
heartbeat of the journal storage turns a killed process's trial into a failed, re-queued one
while the other goes on, and restarting the killed one resumes.
"""

import json
import os
import signal
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState
from test_parallel import wait_for, write_recipe
from tiny_models import write_copy_task

from mergekit_evolve.study.storage import WORKER_KEY, open_storage


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("hosts")
    write_copy_task(root, n_search=96)
    return root


def start(path, run_dir, storage, *extra):
    cmd = [sys.executable, "-m", "mergekit_evolve", str(path), "-o", str(run_dir), "--storage", storage,
           "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


TRIALS = 80


@pytest.mark.slow
def test_two_processes_share_a_journal_study_and_survive_a_kill(workspace, tiny_llama):
    # enough trials that A is still asking for more well after B's heartbeat grace runs out
    # (a tiny trial takes ~0.1 s; with 24, A could finish before B's trial went stale)
    path = write_recipe(workspace, tiny_llama, "hosts", trials=TRIALS, grace=2)
    storage = f"journal:{workspace / 'shared.journal'}"
    a = start(path, workspace / "host-a", storage)
    b = start(path, workspace / "host-b", storage)

    def study():
        try:
            return optuna.load_study(study_name="hosts", storage=open_storage(storage))
        except KeyError:
            return None

    def workers():  # both processes have joined the study (registered as workers)
        s = study() if (workspace / "shared.journal").exists() else None
        return s is not None and sum(k.startswith("mergekit_evolve:worker:") for k in s.user_attrs) == 2

    wait_for(workers, 240, "both processes to join the study")

    def running_in_b():
        done = study().get_trials(states=(TrialState.COMPLETE,))
        running = study().get_trials(states=(TrialState.RUNNING,))
        return len(done) >= 4 and next((t for t in running
                                        if t.user_attrs.get(WORKER_KEY, "").endswith(f":{b.pid}")), None)

    victim = wait_for(running_in_b, 240, "process B to be in the middle of a trial")
    b.send_signal(signal.SIGKILL)  # nobody watches B: only the heartbeat can free its trial
    b.wait()
    out, _ = a.communicate(timeout=600)
    assert a.returncode == 0, out.decode()

    trials = study().trials
    assert not [t for t in trials if t.state == TrialState.RUNNING], "a trial was left running"
    assert trials[victim.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert TRIALS <= len(complete) <= TRIALS + 1  # shared: not TRIALS each
    points = [tuple(sorted(t.params.items())) for t in complete if "failed_trial" not in t.system_attrs]
    assert len(set(points)) == len(points)  # the two processes never proposed the same point

    # host A's run folder has the whole study (its trials.jsonl is rewritten from it at the end)
    numbers = [json.loads(x)["number"] for x in (workspace / "host-a" / "trials.jsonl").read_text().splitlines()]
    assert sorted(numbers) == sorted(t.number for t in trials if t.state.is_finished())

    # restarting the killed process resumes the shared study
    restarted = start(path, workspace / "host-b", storage, "--trials", str(len(complete) + 2))
    out, _ = restarted.communicate(timeout=600)
    assert restarted.returncode == 0, out.decode()
    after = [t for t in study().trials if t.state == TrialState.COMPLETE]
    assert len(after) >= len(complete) + 2
    assert (workspace / "host-b" / "report.json").exists()
    assert os.path.getsize(workspace / "host-b" / "trials.jsonl") > 0
