"""Build the SmolLM2 recipe's LoRA experts and eval data on the CPU, deterministically.

    python recipes/smollm2/train.py            # prepares the base if the cache lacks it

Two skills the base does not do in these terse formats (measured: held-out greedy accuracy
0.03 and 0.00), both between numbers and their English words, which the base knows:

    digits   "sixty-four ="   -> " 64"           scored by generation (greedy, exact match, stop "\n")
    spell    "342 ->"         -> " three hundred forty-two"   scored by loglikelihood (greedy match)

(Country capitals and upper-casing were tried too: LoRA on the top layers only memorised the
training answers, held-out accuracy stayed near 0.)

Each expert is a rank-4 LoRA on q_proj and v_proj of its own layers (digits 24-29, spell 12-23 of
30). The layers below an expert's first are frozen and shared, so their output is computed once
per batch and cached: training runs only the layers from there up (minutes on one core). Fixed seeds,
one torch thread by default; two runs with the same thread count write identical adapters.

Writes ``adapters/<skill>/`` (PEFT folders) and ``data/<skill>_{train,search,heldout}.jsonl``,
then prints each model's greedy accuracy on the held-out split (``--check`` only checks).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import peft
import torch
import transformers

from mergekit_evolve.prepared import prepare

log = logging.getLogger("smollm2.train")
HERE = Path(__file__).resolve().parent

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    if n >= 100:
        return f"{ONES[n // 100]} hundred" + (f" {number_words(n % 100)}" if n % 100 else "")
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])


def make_data(seed: int) -> dict[str, dict[str, list[dict[str, str]]]]:
    """Per skill and split, ``{"prompt", "answer"}`` items; the splits share no input.

    32 search and 32 held-out items each; the rest trains: 26 two-digit numbers for digits,
    160 numbers below 1000 for spell (with fewer, its expert memorises the tens it saw).
    """
    rng = random.Random(seed)
    two_digit = rng.sample(range(10, 100), 90)
    below_1000 = rng.sample(range(10, 1000), 64 + 160)
    digits = [{"prompt": f"{number_words(n)} =", "answer": f" {n}"} for n in two_digit]
    spell = [{"prompt": f"{n} ->", "answer": f" {number_words(n)}"} for n in below_1000]
    return {
        skill: {"search": items[:32], "heldout": items[32:64], "train": items[64:]}
        for skill, items in (("digits", digits), ("spell", spell))
    }


def write_data(data: dict[str, dict[str, list[dict[str, str]]]], out: Path) -> None:
    (out / "data").mkdir(parents=True, exist_ok=True)
    for skill, splits in data.items():
        for split, items in splits.items():
            with open(out / "data" / f"{skill}_{split}.jsonl", "w") as f:
                f.writelines(json.dumps(item) + "\n" for item in items)


def encode(tok, items: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and a mask of the answer tokens (the loss positions)."""
    rows, answer_masks = [], []
    for item in items:
        prompt = tok(item["prompt"], add_special_tokens=False).input_ids
        answer = tok(item["answer"] + "\n", add_special_tokens=False).input_ids
        rows.append(prompt + answer)
        answer_masks.append([0] * len(prompt) + [1] * len(answer))
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    answer = torch.tensor([m + [0] * (width - len(m)) for m in answer_masks])
    return ids, mask, answer


class TopLayers:
    """Training through the top layers only, on cached inputs to the first trained layer."""

    def __init__(self, model, first: int):
        self.model, self.first = model, first
        self.inner = model.get_base_model().model  # LlamaModel
        self._seen: dict = {}

    def cache(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        layer = self.inner.layers[self.first]

        def grab(module, args, kwargs):
            self._seen = {"hidden": (args[0] if args else kwargs.pop("hidden_states")).detach(), **kwargs}
            raise StopIteration  # the rest of the forward is not needed

        handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        except StopIteration:
            pass
        finally:
            handle.remove()
        seen = dict(self._seen)
        return seen.pop("hidden"), seen

    def loss(self, hidden: torch.Tensor, kwargs: dict, ids: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
        for layer in self.inner.layers[self.first :]:
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = self.inner.norm(hidden)
        # position t predicts token t + 1: the loss covers the answer tokens only
        target = answer[:, 1:].bool()
        logits = self.model.get_base_model().lm_head(hidden[:, :-1][target])
        return torch.nn.functional.cross_entropy(logits, ids[:, 1:][target])


def greedy_accuracy(model, tok, items: list[dict[str, str]], max_new_tokens: int = 6) -> float:
    tok.padding_side = "left"
    enc = tok([i["prompt"] for i in items], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    return sum(t.split("\n")[0] == i["answer"] for t, i in zip(texts, items, strict=True)) / len(items)


# Each expert adapts its own layers: two adapters on the same weights overwrite each other when
# added (measured: both at weight ~1 on the top 12 layers scored 0 on both skills).
LAYERS = {"digits": range(24, 30), "spell": range(12, 24)}


def train_expert(base: Path, items: list[dict[str, str]], out: Path, layers: range, args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
        layers_to_transform=list(layers),
    )
    model = peft.get_peft_model(model, config)
    top = TopLayers(model, layers.start)
    rng = random.Random(args.seed)
    order = list(items)
    rng.shuffle(order)
    batches = [encode(tok, order[i : i + args.batch]) for i in range(0, len(order), args.batch)]
    cached = [(*top.cache(ids, mask), ids, answer) for ids, mask, answer in batches]
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    model.train()
    for epoch in range(math.ceil(args.steps / len(cached))):
        total = 0.0
        for hidden, kwargs, ids, answer in cached:
            loss = top.loss(hidden, kwargs, ids, answer)
            optim.zero_grad()
            loss.backward()
            optim.step()
            total += float(loss)
        log.info("%s epoch %d loss %.3f", out.name, epoch, total / len(cached))
    model.eval()
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's blank model card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per expert (whole epochs, at least)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--check", action="store_true", help="only print the held-out accuracies")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    base = prepare("smollm2")
    data = make_data(args.seed)
    if not args.check:
        write_data(data, args.out)
        for skill, splits in data.items():
            start = time.perf_counter()
            train_expert(base, splits["train"], args.out / "adapters" / skill, LAYERS[skill], args)
            log.info("trained %s in %.0f s", skill, time.perf_counter() - start)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for name in ["base", *data]:
        scored = model if name == "base" else peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), args.out / "adapters" / name
        ).eval()
        accs = {skill: greedy_accuracy(scored, tok, splits["heldout"]) for skill, splits in data.items()}
        log.info("held-out greedy accuracy of %s: %s", name, accs)


if __name__ == "__main__":
    main()
