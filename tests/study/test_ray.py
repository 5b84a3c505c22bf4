"""Workers as Ray actors: how many and with what resources, a short search through a local Ray
runtime, and a search on a two-node cluster (two `ray start` nodes on this machine) that loses
its second node in the middle of a trial."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState
from pg_cluster import free_port
from test_parallel import wait_for, write_recipe
from test_postgres import agrees_with_study, just_started, no_trial_lost_or_run_twice, running_in, study_of
from tiny_models import write_copy_task

from mergekit_evolve.cli import cli
from mergekit_evolve.study.ray_actors import plan_actors
from mergekit_evolve.study.storage import WORKER_ATTR, WORKER_KEY


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
    result = CliRunner().invoke(cli, [str(path), "-o", str(run_dir), "--ray", "local", "--workers", "2",
                                      "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="viaray", storage=f"sqlite:///{run_dir / 'study.db'}")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert 8 <= len(done) <= 9
    # both actors joined the study, beside the driver (whether both got a trial of so short a search depends on timing)
    joined = {f"{w['host']}:{w['pid']}" for k, w in study.user_attrs.items() if k.startswith(WORKER_ATTR)}
    actors = {w for w in joined if not w.endswith(f":{os.getpid()}")}
    assert len(joined) == 3 and len(actors) == 2
    assert {t.user_attrs[WORKER_KEY] for t in done} <= actors  # the actors searched, not the driver
    lines = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert len(lines) == len({x["number"] for x in lines}) == len(study.trials)
    assert (run_dir / "best" / "model.safetensors").exists()


# --- a two-node cluster ----------------------------------------------------------------------

SECOND_NODE_IP = "127.0.0.2"  # loopback too; an address of its own, as a second host has
RAY_NODE = ["--num-cpus", "1", "--object-store-memory", str(100 * 2**20), "--disable-usage-stats", "--block"]
# the head's GCS declares a node dead after ~1.5 s without a health check, not Ray's default ~15 s
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
                      "RAY_health_check_failure_threshold": "3"}


class RayNodes:
    """A head and a second node, each a `ray start --block` in its own session and the one temp folder.

    Nothing outside that folder is touched: another Ray on this machine keeps running."""

    def __init__(self) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths have a length limit
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []
        # Without this process's RAY_* settings: a local runtime started in it (the test above) set
        # RAY_AUTH_MODE=token. HOME: Ray reads ~/.ray, where such a runtime leaves its token.
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "HOME": str(self.temp)}
        try:
            self.head = self._start("head", ["--head", "--port", str(self.port), "--temp-dir", str(self.temp),
                                             "--include-dashboard=false"], FAST_HEALTH_CHECKS)
            self.second = self._start("second", ["--address", self.address, "--node-ip-address", SECOND_NODE_IP])
        except BaseException:
            self.remove()
            raise

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.temp / f"{name}.log"
        proc = subprocess.Popen(["ray", "start", *args, *RAY_NODE], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True, env={**self.env, **(env or {})})
        self.nodes.append(proc)
        wait_for(lambda: proc.poll() is not None or "block forever" in log.read_text(), 180,
                 f"Ray's {name} node to start")
        assert proc.poll() is None, log.read_text()
        return proc

    def lose_second_node(self) -> None:
        """As if its host went away: SIGKILL to its `ray start`, raylet and workers at once."""
        kill(descendants(self.second.pid))
        self.second.wait()

    def remove(self) -> None:
        kill([pid for node in self.nodes for pid in descendants(node.pid)])
        for node in self.nodes:
            node.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Ray's workers rename themselves and leave its session,
    but stay children of their node's raylet)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def ray_nodes():
    nodes = RayNodes()
    yield nodes
    nodes.remove()


TWO_NODE_TRIALS = 32


@pytest.mark.slow
def test_two_node_cluster_loses_its_second_node_and_the_head_finishes(tmp_path, tiny_llama, postgres, ray_nodes):
    # trials of ~1-2 s: the kill lands inside the trial it aims at, and the head is still searching when Ray
    # notices the loss
    write_copy_task(tmp_path, n_search=768)
    path = write_recipe(tmp_path, tiny_llama, "twonodes", trials=TWO_NODE_TRIALS, method="gaussian_mutation")
    run_dir = tmp_path / "runs" / "twonodes"
    # the storage every node reaches: PostgreSQL, as on several hosts
    cmd = [sys.executable, "-m", "mergekit_evolve", str(path), "-o", str(run_dir), "--ray", ray_nodes.address,
           "--workers", "2", "--storage", postgres.url, "--no-progress"]
    search = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ray_nodes.env)

    def second_node_actor() -> int | None:  # one CPU a node, one CPU an actor: one actor on each node
        study = study_of(postgres.url, "twonodes")
        pids = [w["pid"] for k, w in (study.user_attrs.items() if study else ()) if k.startswith(WORKER_ATTR)]
        return next((pid for pid in pids if pid in descendants(ray_nodes.second.pid)), None)

    try:
        pid = wait_for(second_node_actor, 300, "the actor on the second node to join the study")
        def fresh_trial() -> optuna.trial.FrozenTrial | None:  # just started: far from its end when the kill lands
            trial = running_in(postgres.url, "twonodes", pid, after=2)
            return trial if just_started(trial, 0.3) else None

        wait_for(fresh_trial, 300, "the second node's actor to start a trial")
        ray_nodes.lose_second_node()
        out, _ = search.communicate(timeout=600)
    finally:
        search.kill()
    assert search.returncode == 0, out.decode()
    assert b"was lost (Ray actor died)" in out

    study = study_of(postgres.url, "twonodes")
    no_trial_lost_or_run_twice(study, TWO_NODE_TRIALS)
    failed = study.get_trials(states=(TrialState.FAIL,))
    if not failed:  # the trial ended in the moment before the kill landed: nothing to re-queue
        agrees_with_study(run_dir, study)
        return
    [victim] = failed  # the trial the second node was in
    assert victim.user_attrs[WORKER_KEY].endswith(f":{pid}")
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.params == victim.params and retry.state == TrialState.COMPLETE
    assert not retry.user_attrs[WORKER_KEY].endswith(f":{pid}")  # the head's actor ran it
    agrees_with_study(run_dir, study)
