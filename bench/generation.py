"""Greedy ``generate_until``: this package's decoding loop vs lm-eval's HFLM, same model, same requests.

    python bench/generation.py [--model FOLDER] [--task-dir recipes/smollm2] [--task digits] [--repeats 3]

The model defaults to the prepared SmolLM2 base (``prepared:smollm2``); the requests are the
task's search and held-out prompts with the task's generation settings (greedy, stop at a
newline). Each side runs ``--repeats`` times on one torch thread; the best run of each counts,
in this process's CPU seconds (the machine's cores may be shared) and wall-clock seconds. The
strings must be equal, or the bench fails. Then the CPU seconds of one decoding step over the KV
cache of six-token prompts, for batches of 1, 8 and the batch size: what leaving finished
sequences out of a step could save.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from mergekit_evolve.evaluate.suite import QuietHFLM
from mergekit_evolve.prepared import prepare

REPO = Path(__file__).resolve().parent.parent


def timed(fn, repeats: int) -> tuple[list[str], float, float]:
    best_cpu = best_wall = float("inf")
    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        out = fn()
        best_cpu, best_wall = min(best_cpu, time.process_time() - cpu), min(best_wall, time.perf_counter() - wall)
    return out, best_cpu, best_wall


@torch.no_grad()
def step_seconds(model, rows: int, repeats: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (rows, 6), generator=torch.Generator().manual_seed(0))
    token = ids[:, -1:]
    best = float("inf")
    for _ in range(repeats):
        cache = model(input_ids=ids, use_cache=True).past_key_values  # each step from a fresh six-token cache
        start = time.process_time()
        model(input_ids=token, past_key_values=cache, use_cache=True)
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--task-dir", type=Path, default=REPO / "recipes" / "smollm2")
    parser.add_argument("--task", default="digits")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-gen-toks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = args.model or prepare("smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = [json.loads(line)["prompt"] for split in ("search", "heldout")
               for line in (args.task_dir / "data" / f"{args.task}_{split}.jsonl").read_text().splitlines()]
    kwargs = {"until": ["\n"], "max_gen_toks": args.max_gen_toks, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)]
    hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    ours = QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    expected, hf_cpu, hf_wall = timed(lambda: hflm.generate_until(requests, disable_tqdm=True), args.repeats)
    got, our_cpu, our_wall = timed(lambda: ours.generate_until(requests), args.repeats)
    assert got == expected, [(a, b) for a, b in zip(got, expected, strict=False) if a != b][:5]
    print(f"{len(requests)} requests from {args.task}, batch {args.batch_size}, model {folder}")
    print("| generate_until | CPU s | wall s | requests/CPU-s |")
    print("| --- | --- | --- | --- |")
    print(f"| lm-eval HFLM | {hf_cpu:.2f} | {hf_wall:.2f} | {len(requests) / hf_cpu:.1f} |")
    print(f"| mergekit-evolve | {our_cpu:.2f} | {our_wall:.2f} | {len(requests) / our_cpu:.1f} |")
    print(f"throughput ratio (CPU): {hf_cpu / our_cpu:.2f}x; identical strings: {len(got)}/{len(expected)}")
    steps = {rows: step_seconds(model, rows, args.repeats + 2) for rows in sorted({1, 8, args.batch_size})}
    print("one decoding step, CPU s by rows: " + ", ".join(f"{rows}: {s:.3f}" for rows, s in steps.items()))


if __name__ == "__main__":
    main()
