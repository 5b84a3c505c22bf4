"""Train the demo's reward model: a tiny Llama that scores how right an answer to a demo prompt is.

Run ``python recipes/demo/train_reward.py`` after ``train.py`` (optionally ``--out DIR``); it
writes ``reward-model/`` (a ``LlamaForSequenceClassification`` folder with one output, the demo
tokenizer) for ``recipes/demo-reward.yml``. ``--check`` trains nothing and measures the shipped
folder. Like ``train.py`` it runs on the CPU from fixed seeds with one thread, so two runs on one
machine write byte-identical weights.

The label is a rule, :func:`character_match`: the share of the expected answer's characters an
answer gets right, position by position (a nearly right answer counts for something, extra
characters cost as misses). The model learns it from (prompt, answer) pairs built from the
*search* prompts only (``data/<skill>_search.jsonl``): the right answer, the answer corrupted at
every level (substituted, swapped, cut or extended characters; the other skills' answers), and
the demo models' own greedy answers. The held-out prompts are used only by the closing check:
the Pearson correlation between the model's scores and the rule on search and held-out answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import torch
from train import SKILLS, build_tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

log = logging.getLogger("demo.train_reward")

HERE = Path(__file__).resolve().parent
SOURCES = ["base", "copy", "reverse", "sort"]
SEED = 4321
STEPS = 1500
BATCH = 64
LR = 2e-3


def character_match(answer: str, expected: str) -> float:
    """The share of ``expected``'s positions that ``answer`` gets right; extra characters cost as misses."""
    right = sum(a == b for a, b in zip(answer, expected, strict=False))
    return right / max(len(expected), len(answer), 1)


def read_items(demo: Path, split: str) -> list[dict[str, str]]:
    """Every skill's items of one split, each with the skill's alphabet and input text added."""
    items = []
    for skill in SKILLS:
        for line in (demo / "data" / f"{skill.name}_{split}.jsonl").read_text().splitlines():
            item = json.loads(line)
            text = item["prompt"][len(skill.tag) + 1 : -1]
            items.append({**item, "alphabet": skill.alphabet, "text": text})
    return items


@torch.no_grad()
def greedy_answers(demo: Path, tok: PreTrainedTokenizerFast, prompts: list[str]) -> dict[str, list[str]]:
    """Each demo model's greedy answers (what the search's candidates will answer like)."""
    encoded = [tok(p).input_ids for p in prompts]
    width = max(len(x) for x in encoded)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in encoded])
    mask = (ids != tok.pad_token_id).long()
    out = {}
    for name in SOURCES:
        model = AutoModelForCausalLM.from_pretrained(demo / "models" / name, dtype=torch.float32).eval()
        rows = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              pad_token_id=tok.pad_token_id)
        out[name] = [tok.decode(r[width:], skip_special_tokens=True) for r in rows]
    return out


def corrupt(rng: random.Random, item: dict[str, str]) -> str:
    """The item's answer spoiled at a random level, in the ways a weak model gets it wrong."""
    answer, alphabet = item["answer"], item["alphabet"]
    kind = rng.random()
    if kind < 0.15:  # another skill's answer to the same input (e.g. not reversed, not sorted)
        return rng.choice([item["text"], item["text"][::-1], "".join(sorted(item["text"]))])
    chars = list(answer)
    if kind < 0.7:  # 1 .. all positions substituted
        for i in rng.sample(range(len(chars)), rng.randint(1, len(chars))):
            chars[i] = rng.choice(alphabet.replace(chars[i], ""))
    elif kind < 0.8:  # two neighbours swapped
        i = rng.randrange(len(chars) - 1)
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    elif kind < 0.9:  # cut short (possibly to nothing)
        chars = chars[: rng.randrange(len(chars))]
    else:  # run on past the end
        chars += [rng.choice(alphabet) for _ in range(rng.randint(1, 3))]
    return "".join(chars)


def batch_tensors(tok: PreTrainedTokenizerFast, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask of ``<s> prompt answer``, the text the reward scorer feeds it."""
    encoded = [tok(t).input_ids for t in texts]
    width = max(len(x) for x in encoded)
    ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in encoded])
    return ids, (ids != tok.pad_token_id).long()


def build_model(tok: PreTrainedTokenizerFast) -> LlamaForSequenceClassification:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        num_labels=1,
        problem_type="regression",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        # the classifier reads the last non-pad token, so the pad id must be known
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(SEED)
    return LlamaForSequenceClassification(config)


def train(demo: Path, out: Path, tok: PreTrainedTokenizerFast) -> None:
    rng = random.Random(SEED)
    items = read_items(demo, "search")
    generated = greedy_answers(demo, tok, [i["prompt"] for i in items])
    # (item, answer) pairs of the models' own answers, to mix into every batch
    own = [(item, answers[k]) for answers in generated.values() for k, item in enumerate(items)]
    model = build_model(tok)
    log.info("reward model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = STEPS // 20
    # linear warmup, then cosine decay to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / STEPS))))
    for step in range(STEPS):
        texts, labels = [], []
        for _ in range(BATCH):
            r = rng.random()
            if r < 0.15:
                item, answer = rng.choice(own)
            else:
                item = rng.choice(items)
                answer = item["answer"] if r < 0.35 else corrupt(rng, item)
            texts.append(item["prompt"] + answer)
            labels.append(character_match(answer, item["answer"]))
        ids, mask = batch_tensors(tok, texts)
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor(labels)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == STEPS - 1:
            log.info("step %d/%d mse %.4f", step + 1, STEPS, loss.item())
    model.eval().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return cov / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))


@torch.no_grad()
def check(demo: Path, folder: Path, tok: PreTrainedTokenizerFast) -> None:
    """Log how the reward model's scores track the rule, on the search prompts it learnt from and the held-out ones."""
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype="auto").eval()
    for split in ("search", "heldout"):
        items = read_items(demo, split)
        rng = random.Random(SEED + 1)
        generated = greedy_answers(demo, tok, [i["prompt"] for i in items])
        sets = {"corrupted": [(i, i["answer"] if rng.random() < 0.2 else corrupt(rng, i)) for i in items]}
        sets |= {f"{name}'s answers": list(zip(items, answers, strict=True)) for name, answers in generated.items()}
        for name, pairs in sets.items():
            ids, mask = batch_tensors(tok, [i["prompt"] + a for i, a in pairs])
            scores = model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
            rule = [character_match(a, i["answer"]) for i, a in pairs]
            log.info("%-7s %-18s n=%d  rule mean %.3f  reward mean %.3f  pearson %.3f", split, name, len(pairs),
                     sum(rule) / len(rule), sum(scores) / len(scores), pearson(scores, rule))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=HERE, help="folder with models/ and data/")
    parser.add_argument("--out", type=Path, default=HERE / "reward-model")
    parser.add_argument("--check", action="store_true", help="only measure the folder at --out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # one thread and deterministic kernels: byte-identical weights run after run (as train.py)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tok = build_tokenizer()
    if not args.check:
        t0 = time.perf_counter()
        train(args.demo, args.out, tok)
        log.info("trained in %.1f s", time.perf_counter() - t0)
    check(args.demo, args.out, tok)


if __name__ == "__main__":
    main()
