"""Benchmark of the evolve loop; prints its figures, all measured side by side in this one run.

    python bench/evolve_loop.py [--trials 20] [--params 100M] [--section all|demo|synthetic]

1. The demo search (recipes/demo.yml): per trial, seconds merging, evaluating, and the rest,
   and the share of each trial spent outside the model's forward passes. It runs as the CLI
   runs it: the recipe's torch threads, numba's pool sized to them.
2. On a synthetic ~100M-parameter Llama family: in-memory materialisation of one candidate vs
   a disk round-trip (mergekit run_merge to disk + transformers from_pretrained).
3. The same family: bytes moved per second by linear and task_arithmetic merges (the merge
   kernel the engine runs per tensor, and the whole materialize()) vs a plain torch copy of
   the same tensors, at 1 thread and at all of torch's (2 and 3 run in a child process whose
   numba pool holds every core).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# read before the package's first merge sets it to the demo's torch threads in this process
NUMBA_THREADS = os.environ.get("NUMBA_NUM_THREADS", str(os.cpu_count()))

import optuna  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.graph import Executor  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from tiny_models import make_family  # noqa: E402

from mergekit_evolve.merge.chunked import ChunkedMerge  # noqa: E402
from mergekit_evolve.merge.engine import InMemoryMerger  # noqa: E402
from mergekit_evolve.recipe.document import load_recipe  # noqa: E402
from mergekit_evolve.recipe.evolve_settings import PruningSettings  # noqa: E402
from mergekit_evolve.study.search import run_search  # noqa: E402
from mergekit_evolve.study.worker import Worker, merge_options  # noqa: E402


def timed(fn, repeat: int = 3) -> float:
    """Best of ``repeat`` wall-clock runs (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def demo_search(trials: int) -> None:
    recipe = load_recipe(REPO / "recipes" / "demo.yml")
    # every candidate scored in full, so each row is a whole trial (bench/cheap_fitness.py measures pruning)
    recipe.evolve.pruning = PruningSettings(pruner="none")
    if recipe.evolve.threads:
        torch.set_num_threads(recipe.evolve.threads)  # as the CLI does
    worker = Worker(recipe, merge_options(recipe))
    forward = {"seconds": 0.0}

    def pre(module, args, kwargs):
        forward["t"] = time.perf_counter()

    def post(module, args, kwargs, output):
        forward["seconds"] += time.perf_counter() - forward["t"]

    with tempfile.TemporaryDirectory() as tmp:
        hooks_on: set[int] = set()
        original = worker.merger.materialize

        def materialize(config):
            m = original(config)
            if id(m) not in hooks_on:
                m.register_forward_pre_hook(pre, with_kwargs=True)
                m.register_forward_hook(post, with_kwargs=True)
                hooks_on.add(id(m))
            return m

        worker.merger.materialize = materialize
        fwd_by_trial = {}
        original_objective = worker.objective

        def objective(trial):
            forward["seconds"] = 0.0
            value = original_objective(trial)
            fwd_by_trial[trial.number] = forward["seconds"]
            return value

        worker.objective = objective
        run_dir = Path(tmp)
        study = run_search(recipe, run_dir, worker, trials, show_progress=False)
        rows = [json.loads(x) for x in (run_dir / "trials.jsonl").read_text().splitlines()]
    print(f"\n== demo search: {trials} trials of recipes/demo.yml (sampler {recipe.evolve.sampler}) ==")
    print(f"{'trial':>5} {'merge s':>8} {'eval s':>8} {'forward s':>9} "
          f"{'other s':>8} {'total s':>8} {'outside fwd':>11}")
    totals = {"merge": 0.0, "evaluate": 0.0, "other": 0.0, "total": 0.0, "forward": 0.0}
    shares: list[float] = []
    for r in rows:
        if r["state"] != "COMPLETE" or r["reused_from"] is not None:
            continue
        s = r["seconds"]
        fwd = fwd_by_trial.get(r["number"], 0.0)
        outside = 1 - fwd / s["total"]
        shares.append(outside)
        print(f"{r['number']:>5} {s['merge']:>8.3f} {s['evaluate']:>8.3f} {fwd:>9.3f} "
              f"{s['other']:>8.3f} {s['total']:>8.3f} {outside:>10.1%}")
        for k in ("merge", "evaluate", "other", "total"):
            totals[k] += s[k]
        totals["forward"] += fwd
    print(f"{'all':>5} {totals['merge']:>8.3f} {totals['evaluate']:>8.3f} {totals['forward']:>9.3f} "
          f"{totals['other']:>8.3f} {totals['total']:>8.3f} {1 - totals['forward'] / totals['total']:>10.1%}")
    print(f"median share outside the forward passes {statistics.median(shares):.1%} (target < 10%; one-off costs, "
          "the resident model, numba compiling its kernels, the sampler's imports, are paid when the worker starts)")
    print(f"best search objective {study.best_value:.4f}")


def synthetic_family(root: Path, params: str) -> list[Path]:
    size = {"100M": (768, 12, 2048, 32000), "20M": (384, 6, 1024, 16000)}[params]
    hidden, layers, inter, vocab = size
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=12 if hidden % 12 == 0 else 8, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return make_family(root, config=config)


def materialisation_vs_disk(paths: list[Path]) -> None:
    base, v1, v2 = (str(p) for p in paths)
    config = MergeConfiguration.model_validate({
        "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
        "models": [{"model": v1, "parameters": {"weight": 0.6}}, {"model": v2, "parameters": {"weight": 0.4}}],
    })
    options = MergeOptions(quiet=True, device="cpu")
    merger = InMemoryMerger(options)
    n_params = sum(p.numel() for p in merger.materialize(config).parameters())
    in_memory = timed(lambda: merger.materialize(config))
    with tempfile.TemporaryDirectory() as tmp:
        def round_trip() -> None:
            out = Path(tmp) / "merged"
            run_merge(config.model_copy(deep=True), str(out), options=options)
            transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)

        disk = timed(round_trip, repeat=2)
    print(f"\n== materialise one candidate ({n_params / 1e6:.0f}M parameters, task_arithmetic of 2 + base) ==")
    print(f"in memory      {in_memory:8.3f} s")
    print(f"disk round-trip{disk:8.3f} s   (run_merge to disk + from_pretrained)")
    print(f"ratio          {disk / in_memory:8.1f}x  (target >= 5x)")


DEFAULT_THREADS = torch.get_num_threads()  # before the demo search sets its recipe's


def interleaved(fns: list, repeat: int = 3) -> list[float]:
    """Best of ``repeat`` wall-clock runs of each (after one warm-up), the runs taken in turn so
    that all see the same moments of a shared machine."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def merge_calls(merger: InMemoryMerger, config: MergeConfiguration) -> list[tuple[ChunkedMerge, dict, torch.Tensor]]:
    """Every tensor's merge as the engine runs it: the ChunkedMerge task, its gathered resident
    inputs, and a preallocated output (gathered once here: only the merge itself is timed)."""
    merger.materialize(config)  # makes the sources resident
    merges = [t.tensor_task for t in merger.plan(config)[2]]
    assert all(isinstance(m, ChunkedMerge) for m in merges)
    gathers = [m.inner.gather_tensors for m in merges]
    gathered = dict(Executor(gathers, math_device="cpu", storage_device="cpu").run(quiet=True))
    calls = []
    for merge, gather in zip(merges, gathers, strict=False):
        tensors = gathered[gather]
        calls.append((merge, tensors, torch.empty_like(next(iter(tensors.values())))))
    return calls


def bandwidth(paths: list[Path]) -> None:
    base, v1, v2 = (str(p) for p in paths)
    options = MergeOptions(quiet=True, device="cpu")
    merger = InMemoryMerger(options)
    configs = {
        "linear": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": v1, "parameters": {"weight": 0.5}}, {"model": v2, "parameters": {"weight": 0.5}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32", "models": [
            {"model": v1, "parameters": {"weight": 0.5}}, {"model": v2, "parameters": {"weight": 0.5}}]},
    }
    threads_before = torch.get_num_threads()
    print("\n== bandwidth (best of 3 after a warm-up, taken in turn) ==")
    for name, cfg in configs.items():
        config = MergeConfiguration.model_validate(cfg)
        calls = merge_calls(merger, config)
        inputs = len(calls[0][1])
        model_bytes = sum(out.numel() * out.element_size() for _, _, out in calls)
        sources = [next(iter(tensors.values())) for _, tensors, _ in calls]

        def copy_all(sources=sources, calls=calls) -> None:  # bound now: run within this iteration anyway
            for src, (_, _, dst) in zip(sources, calls, strict=False):
                dst.copy_(src)

        def merge_all(calls=calls) -> None:
            for merge, tensors, out in calls:
                merge.run_into(tensors, out)

        print(f"{name} ({inputs} inputs, {len(calls)} tensors, {model_bytes / 1e6:.0f} MB out):")
        for threads in sorted({1, DEFAULT_THREADS}):  # one thread, as the demo recipe sets; all of torch's default
            torch.set_num_threads(threads)
            copy_s, merge_s, whole_s = interleaved([copy_all, merge_all,
                                                    lambda config=config: merger.materialize(config)])
            copy_bw = 2 * model_bytes / copy_s
            print(f"  {threads} torch thread(s): torch copy of the same tensors {copy_bw / 1e9:6.2f} GB/s "
                  "(dst.copy_(src): read + write)")
            for label, seconds in (("merge kernel (run_into)", merge_s), ("whole materialize()", whole_s)):
                bw = (inputs + 1) * model_bytes / seconds
                print(f"    {label:<25} {bw / 1e9:6.2f} GB/s = {bw / copy_bw:6.1%} of copy; {seconds:.3f} s")
    torch.set_num_threads(threads_before)
    print("  (target: merge kernel >= 70% of copy; materialize() adds mergekit's planning of every tensor)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--params", choices=["100M", "20M"], default="100M")
    parser.add_argument("--section", choices=["all", "demo", "synthetic"], default="all")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.manual_seed(0)
    if args.section in ("all", "demo") and (REPO / "recipes" / "demo.yml").exists():
        demo_search(args.trials)
    if args.section == "all":
        # numba sizes its thread pool once, at import: the demo ran with the pool the CLI gives it
        # (torch's threads, 1), the kernels are measured at 1 and 2 threads, so they need a fresh
        # process whose pool holds every core
        env = {**os.environ, "NUMBA_NUM_THREADS": NUMBA_THREADS}
        subprocess.run([sys.executable, __file__, "--section", "synthetic", "--params", args.params],
                       env=env, check=True)
    elif args.section == "synthetic":
        with tempfile.TemporaryDirectory() as tmp:
            paths = synthetic_family(Path(tmp), args.params)
            materialisation_vs_disk(paths)
            bandwidth(paths)


if __name__ == "__main__":
    main()
