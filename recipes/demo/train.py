"""Build the offline demo: a tiny character-level Llama base, one expert per skill, eval data.

Run ``python recipes/demo/train.py`` (optionally ``--out DIR``). Everything is generated from
fixed seeds on the CPU, so two runs on one machine with the same thread count give identical
weights; another CPU or torch build rounds differently and trains slightly different ones.
Training runs in float32; the models are written in bfloat16, which halves the files while the
demo's merge still beats every expert on held-out data.

Layout written under ``--out`` (default: this file's folder)::

    models/base, models/copy, models/reverse, models/sort   # Hugging Face folders
    data/<skill>_search.jsonl, data/<skill>_heldout.jsonl   # {"prompt": ..., "answer": ...}

Why it is built this way (see the project's notes on tiny CPU models): the base is trained
briefly on the *mixture* of all skills, so it knows the prompt format and is weak at each;
each expert is fine-tuned from that base at a small learning rate with a little replay of the
mixture. Each skill works on its own alphabet (digits, a-j, k-t), like two languages, so the
experts' task vectors are nearly orthogonal (cosine ~0.1) instead of overwriting one shared
"which character next" circuit. Task arithmetic over the experts then beats every single
model, which is what the evolutionary search is meant to discover.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger("demo.train")

HERE = Path(__file__).resolve().parent

# Special tokens first so their ids are stable: pad=0, bos=1, eos=2, unk=3.
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
# Digits, letters, and a few symbols: the skills use digits, a-j and k-t, the tags use capitals;
# the rest is spare so new skills or tags need no new embedding rows.
CHARS = list("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:=,. ")
MAX_POSITIONS = 32  # longest sequence: <s> + "SRT:" + 8 + "=" + 8 + </s> = 23 tokens


# --------------------------------------------------------------------------------------------
# Skills
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Skill:
    name: str
    tag: str
    alphabet: str
    fn: Callable[[str], str]

    def prompt(self, text: str) -> str:
        return f"{self.tag}:{text}="

    def item(self, text: str) -> dict[str, str]:
        return {"prompt": self.prompt(text), "answer": self.fn(text)}


SKILLS: list[Skill] = [
    Skill("copy", "CPY", "0123456789", lambda s: s),
    Skill("reverse", "REV", "abcdefghij", lambda s: s[::-1]),
    Skill("sort", "SRT", "klmnopqrst", lambda s: "".join(sorted(s))),
]


@dataclass
class Settings:
    """Training settings. The defaults are the ones that made task arithmetic win (see README)."""

    seed: int = 1234
    # One thread: bit-reproducible, and faster than two when other jobs share the 2 cores.
    threads: int = 1
    min_len: int = 5
    max_len: int = 8
    # model
    # ~4M parameters: big enough that a trial's forward passes outweigh the search loop's own
    # per-trial work (at 0.8M they took 0.15 s and the loop's fixed costs dominated)
    hidden: int = 256
    intermediate: int = 512
    layers: int = 6
    heads: int = 8
    # base: short run on the mixture so it is weak at every skill
    base_steps: int = 300
    base_lr: float = 1e-3
    # experts: small lr and a little replay of the mixture. More replay makes every expert
    # learn the shared part too (task vectors align and over-add when merged); none makes
    # each expert forget the other skills (task vectors fight).
    expert_steps: int = 150
    expert_lr: float = 3e-4
    replay: float = 0.1
    # Sampling weight of each skill (SKILLS order) in the mixture: reverse is the hardest, so it
    # gets more data and the base starts from a similar (weak) level on every skill.
    mix: tuple[float, ...] = (1.0, 2.0, 1.0)
    batch: int = 32
    n_search: int = 80
    n_heldout: int = 200


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level WordLevel tokenizer that prepends <s> like Llama's (lm-eval relies on it)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token, so the WordLevel lookup is per character.
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse joins tokens without the spaces WordLevel decoding would insert.
    tk.decoder = decoders.Fuse()
    # The models are trained with a leading <s>; lm-eval's HFLM encodes with the tokenizer's
    # default add_special_tokens=True, so this template makes eval match training.
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_POSITIONS,
    )


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def random_text(rng: random.Random, cfg: Settings, skill: Skill) -> str:
    n = rng.randint(cfg.min_len, cfg.max_len)
    return "".join(rng.choice(skill.alphabet) for _ in range(n))


def make_eval_sets(cfg: Settings) -> tuple[dict[str, dict[str, list[dict[str, str]]]], set[str]]:
    """Search and held-out items per skill; returns them and every input string they use.

    Input strings are unique across all eval sets, and training never uses them, so held-out
    scores measure the skill, not memorisation.
    """
    rng = random.Random(cfg.seed + 1)
    used: set[str] = set()
    sets: dict[str, dict[str, list[dict[str, str]]]] = {}
    for skill in SKILLS:
        sets[skill.name] = {}
        for split, n in (("search", cfg.n_search), ("heldout", cfg.n_heldout)):
            items: list[dict[str, str]] = []
            while len(items) < n:
                text = random_text(rng, cfg, skill)
                if text in used:
                    continue
                used.add(text)
                items.append(skill.item(text))
            sets[skill.name][split] = items
    return sets, used


def encode_example(tok: PreTrainedTokenizerFast, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of <s> prompt answer </s>, and where the answer starts."""
    p = tok(prompt).input_ids  # includes <s>
    a = tok(answer, add_special_tokens=False).input_ids
    return p + a + [tok.eos_token_id], len(p)


def make_batches(
    tok: PreTrainedTokenizerFast,
    cfg: Settings,
    steps: int,
    seed: int,
    reserved: set[str],
    focus: Skill | None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Pre-built batches (ids, attention mask, labels). Loss is on answer + eos only.

    With ``focus`` set, a ``1 - replay`` share of each batch is that skill and the rest is the
    uniform mixture (replay), which keeps the expert close to the base on the other skills.
    """
    rng = random.Random(seed)
    batches = []
    for _ in range(steps):
        seqs: list[list[int]] = []
        starts: list[int] = []
        for _ in range(cfg.batch):
            if focus is not None and rng.random() >= cfg.replay:
                skill = focus
            else:
                skill = rng.choices(SKILLS, weights=cfg.mix)[0]
            text = random_text(rng, cfg, skill)
            while text in reserved:
                text = random_text(rng, cfg, skill)
            item = skill.item(text)
            ids, start = encode_example(tok, item["prompt"], item["answer"])
            seqs.append(ids)
            starts.append(start)
        width = max(len(s) for s in seqs)
        ids_t = torch.full((cfg.batch, width), tok.pad_token_id, dtype=torch.long)
        mask_t = torch.zeros((cfg.batch, width), dtype=torch.long)
        labels_t = torch.full((cfg.batch, width), -100, dtype=torch.long)
        for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
            ids_t[i, : len(s)] = torch.tensor(s)
            mask_t[i, : len(s)] = 1
            labels_t[i, st : len(s)] = torch.tensor(s[st:])
        batches.append((ids_t, mask_t, labels_t))
    return batches


def write_jsonl(path: Path, items: Iterable[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")


# --------------------------------------------------------------------------------------------
# Model and training
# --------------------------------------------------------------------------------------------


def build_model(tok: PreTrainedTokenizerFast, cfg: Settings) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=MAX_POSITIONS,
        # Untied so mergekit treats lm_head as an ordinary tensor to merge.
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config).to(torch.float32)


def train(
    model: LlamaForCausalLM,
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    lr: float,
    label: str,
) -> None:
    """AdamW with a short warmup and cosine decay to 10% of ``lr``."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    steps = len(batches)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for step, (ids, mask, labels) in enumerate(batches):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f", label, step + 1, steps, loss.item())
    model.eval()


@torch.no_grad()
def greedy_accuracy(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, items: list[dict[str, str]]
) -> float:
    """Share of items whose answer is the greedy continuation (same as lm-eval's ``acc``)."""
    seqs, starts, ends = [], [], []
    for item in items:
        p = tok(item["prompt"]).input_ids
        a = tok(item["answer"], add_special_tokens=False).input_ids
        seqs.append(p + a)
        starts.append(len(p))
        ends.append(len(p) + len(a))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    hits = 0
    for i in range(len(seqs)):
        # logits at position t predict token t + 1
        hits += bool(torch.equal(pred[i, starts[i] - 1 : ends[i] - 1], ids[i, starts[i] : ends[i]]))
    return hits / len(seqs)


def save_model(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, path: Path) -> None:
    """Write a bf16 copy; the model itself stays float32 for the experts' training."""
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=10,
        do_sample=False,
    )
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def setup_determinism(cfg: Settings) -> None:
    # Fixed thread count: CPU reductions are only bit-reproducible for a given thread count.
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    torch.use_deterministic_algorithms(True)


def run(out: Path, cfg: Settings) -> dict[str, dict[str, float]]:
    """Train everything, write models and data under ``out``; return held-out accuracies."""
    t0 = time.perf_counter()
    setup_determinism(cfg)
    tok = build_tokenizer()

    eval_sets, reserved = make_eval_sets(cfg)
    for skill, splits in eval_sets.items():
        for split, items in splits.items():
            write_jsonl(out / "data" / f"{skill}_{split}.jsonl", items)

    model = build_model(tok, cfg)
    log.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    base_batches = make_batches(tok, cfg, cfg.base_steps, cfg.seed + 10, reserved, focus=None)
    train(model, base_batches, cfg.base_lr, "base")
    save_model(model, tok, out / "models" / "base")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    models_acc: dict[str, dict[str, float]] = {}

    def report(name: str, m: LlamaForCausalLM) -> None:
        acc = {s.name: greedy_accuracy(m, tok, eval_sets[s.name]["heldout"]) for s in SKILLS}
        acc["mean"] = sum(acc.values()) / len(SKILLS)
        models_acc[name] = acc
        log.info("%s held-out acc: %s", name, {k: round(v, 3) for k, v in acc.items()})

    report("base", model)
    for i, skill in enumerate(SKILLS):
        model.load_state_dict(base_state)
        batches = make_batches(
            tok, cfg, cfg.expert_steps, cfg.seed + 100 + i, reserved, focus=skill
        )
        train(model, batches, cfg.expert_lr, skill.name)
        save_model(model, tok, out / "models" / skill.name)
        report(skill.name, model)
    log.info("done in %.1f s", time.perf_counter() - t0)
    return models_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: here)")
    parser.add_argument("--threads", type=int, default=Settings.threads)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Never reach for the Hub: everything here is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run(args.out, Settings(threads=args.threads))


if __name__ == "__main__":
    main()
