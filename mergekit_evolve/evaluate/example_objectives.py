"""Objectives scored outside lm-eval, one float per example: the interface every such kind implements.

A kind (a Python function, a reward model; a judge model would be one more) reads its examples
from JSONL files named in the recipe and turns a list of them into one score each. The
``Evaluator`` treats the result like a task whose metric is that score, aggregated by its mean,
so the per-example store, staged pruning, anchors and the held-out split work alike for all.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import transformers

from mergekit_evolve.recipe.evolve_settings import ExampleObjective, GenerationSettings

Split = Literal["search", "heldout"]


class TaskSetupError(ValueError):
    """An objective cannot be used as written; ``task`` and ``field`` (of the objective) say where."""

    def __init__(self, message: str, task: str | None = None, field: str | None = None):
        super().__init__(message)
        self.task, self.field = task, field


class ObjectiveError(RuntimeError):
    """The user's scoring code failed or returned something unusable; the message is the whole line to show."""


def mean(values: Sequence[float]) -> float:
    """The aggregate of per-example scores (named ``mean``: anchors accept mean-aggregated metrics only)."""
    return math.fsum(values) / len(values)


def limited(n: int, limit: int | float | None) -> int:
    """How many of ``n`` examples a ``limit`` (a count, or a fraction below 1) keeps, as lm-eval reads it."""
    if limit is None:
        return n
    return min(n, math.ceil(n * limit) if isinstance(limit, float) and limit < 1 else int(limit))


def file_digest(path: Path) -> str:
    """A short hash of a file's content; of a large one (a reward model's weights) its size, head and tail,
    so a resume does not read gigabytes to notice a changed file."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size <= 2 * _CHUNK:
            digest.update(f.read())
        else:
            digest.update(str(size).encode() + f.read(_CHUNK))
            f.seek(-_CHUNK, 2)
            digest.update(f.read())
    return digest.hexdigest()[:16]


_CHUNK = 4 * 2**20


def read_jsonl(base_dir: Path, value: str, field: str) -> list[dict[str, Any]]:
    """The examples of a recipe's JSONL file; any problem is a ``TaskSetupError`` naming ``field``."""
    path = (base_dir / value).resolve()
    if not path.is_file():
        raise TaskSetupError(f"{field}: no file '{value}' (looked at {path})", field=field)
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskSetupError(f"{field}: {value}:{number} is not JSON ({e.msg}); "
                                 "a JSONL file holds one object a line", field=field) from None
        if not isinstance(example, dict):
            raise TaskSetupError(f"{field}: {value}:{number} is a {type(example).__name__}, not a JSON object",
                                 field=field)
        examples.append(example)
    if not examples:
        raise TaskSetupError(f"{field}: {value} has no examples", field=field)
    return examples


class ExampleScorer(ABC):
    """One objective's examples (search and held-out) and how to score the resident model on them."""

    def __init__(self, objective: ExampleObjective, base_dir: Path, apply_chat_template: bool):
        self.objective, self.base_dir, self.apply_chat_template = objective, base_dir, apply_chat_template
        search, heldout = objective.data_fields
        self.examples: dict[Split, list[dict[str, Any]]] = {
            "search": read_jsonl(base_dir, getattr(objective, search), search)}
        if getattr(objective, heldout):
            self.examples["heldout"] = read_jsonl(base_dir, getattr(objective, heldout), heldout)

    def split_examples(self, split: Split) -> list[dict[str, Any]]:
        """A split's examples: without held-out data the held-out split re-scores the search data."""
        return self.examples.get(split, self.examples["search"])

    def store_key(self, split: Split) -> str:
        """The name its rows have in the example store: never an lm-eval task's (those hold no ':' and '@')."""
        return f"{self.objective.field}@{self.objective.name}:{split if split in self.examples else 'search'}"

    def files(self) -> list[Path]:
        """The files whose content its scores depend on (a resumed run notices a change)."""
        fields = [f for f in self.objective.data_fields if getattr(self.objective, f)]
        return [(self.base_dir / getattr(self.objective, f)).resolve() for f in fields]

    def check(self) -> None:  # noqa: B027 (a kind with nothing to check beyond its data keeps this)
        """What can be known wrong before any weight loads (the data is read already); raises ``TaskSetupError``."""

    def check_prompts(self) -> None:
        """Every example of both splits has a ``prompt`` string (for kinds that generate answers)."""
        field = self.objective.data_fields[0]
        for number, example in enumerate(self.examples["search"] + self.examples.get("heldout", []), start=1):
            if not isinstance(example.get("prompt"), str):
                raise TaskSetupError(f"{field}: example {number} has no 'prompt' string (keys: {sorted(example)})",
                                     field=field)

    def model_config(self, field: str) -> transformers.PretrainedConfig:
        """The ``config.json`` of the model folder the objective's ``field`` names (no weights read)."""
        value = getattr(self.objective, field)
        folder = (self.base_dir / value).resolve()
        if not (folder / "config.json").is_file():
            raise TaskSetupError(f"{field}: no config.json in '{value}' (looked at {folder})", field=field)
        try:
            return transformers.AutoConfig.from_pretrained(folder)
        except Exception as e:  # transformers raises OSError, ValueError, KeyError for a bad config.json
            raise TaskSetupError(f"{field}: cannot read {folder / 'config.json'}: {e}", field=field) from None

    def rows(self, model: transformers.PreTrainedModel, tokenizer: Any, split: Split,
             ids: list[int]) -> dict[int, dict[str, Any]]:
        """Examples ``ids`` of ``split`` scored now, as per-example rows keyed like lm-eval's metrics."""
        examples = self.split_examples(split)
        values = self.score(model, tokenizer, ids, [examples[i] for i in ids])
        if not isinstance(values, Sequence) or len(values) != len(ids):
            got = f"{len(values)} values" if isinstance(values, Sequence) else type(values).__name__
            raise ObjectiveError(f"objective {self.objective.name}: got {got} for {len(ids)} examples "
                                 "(expected one float per example)")
        rows = {}
        for i, value in zip(ids, values, strict=False):
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ObjectiveError(f"objective {self.objective.name}: example {i} scored {value!r}, "
                                     "not a number") from None
            if not math.isfinite(number):
                raise ObjectiveError(f"objective {self.objective.name}: example {i} scored {number}")
            rows[i] = {self.objective.metric: number}
        for i, extra in self.row_extras(ids).items():
            rows[i].update(extra)
        return rows

    def row_extras(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """What the last ``score`` call learnt about each example beyond its score, stored in its row
        (a parsed judge: how many replies it could not read); nothing for most kinds."""
        return {}

    def unparsed(self, rows: list[dict[str, Any]]) -> tuple[int, int] | None:
        """How many of the judgements behind ``rows`` could not be read, of how many; None for a kind
        that reads none (only a judge whose reply is parsed does)."""
        return None

    @abstractmethod
    def score(self, model: transformers.PreTrainedModel, tokenizer: Any, ids: list[int],
              examples: list[dict[str, Any]]) -> Sequence[float]:
        """One score per example; ``ids`` are their positions in the split (to seed sampling by)."""


def chat_prompt(tokenizer: Any, prompt: str, apply_chat_template: bool) -> str:
    """The text the model continues: the prompt as one user turn of its chat template when asked for."""
    if not apply_chat_template:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def complete(model: transformers.PreTrainedModel, tokenizer: Any, prompts: list[str], ids: list[int],
             settings: GenerationSettings, apply_chat_template: bool, batch_size: int = 16) -> list[str]:
    """The resident model's answer to each prompt (what a reward or judge model then scores).

    Greedy answers are decoded in left-padded batches; sampled ones one by one, each seeded by
    ``settings.seed`` and its example id, so an example's answer does not depend on which others
    were asked with it (stored rows stay valid for any slice of the split)."""
    texts = [chat_prompt(tokenizer, p, apply_chat_template) for p in prompts]
    # a chat template writes its own special tokens
    encoded = [tokenizer(t, add_special_tokens=not apply_chat_template)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    step = 1 if settings.do_sample else batch_size
    answers: list[str] = []
    for start in range(0, len(encoded), step):
        batch = encoded[start : start + step]
        width = max(len(x) for x in batch)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=model.device)
        options: dict[str, Any] = {"do_sample": settings.do_sample, "max_new_tokens": settings.max_new_tokens,
                                   "pad_token_id": pad}
        if settings.do_sample:
            options["temperature"] = settings.temperature
        else:  # the model's generation config may sample by default: greedy means greedy
            options.update(temperature=None, top_p=None, top_k=None)
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            if settings.do_sample:
                torch.manual_seed(settings.seed * 1_000_003 + ids[start])
            out = model.generate(input_ids=input_ids, attention_mask=mask, **options)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    return answers
