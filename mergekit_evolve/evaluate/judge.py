"""``judge_model:`` objectives: the resident model answers each prompt, a local causal LM rates the answer.

The judge reads the recipe's rubric with the prompt and the answer filled in (as one user turn of
its chat template when it has one) and the score is its expected rating: the ratings (``1`` to
``5`` by default, each one token of the judge's tokenizer) weighted by the judge's next-token
probabilities renormalised over them. No text is sampled from the judge, so a score is
deterministic and graded (a 3.6 tells more than a 4). Loaded once per worker, on the resident
model's device, when first needed.

In ``pairwise`` mode the judge compares the answer with a reference source's answer to the same
prompt, once with the candidate as answer A and once as answer B: an LLM judge favours one
position (Zheng et al. 2023, MT-Bench), and averaging both orders cancels that bias. Each order
gives the probability of the verdict naming the candidate (renormalised over the two verdicts);
the score is their mean, from 0 to 1, and a candidate answering like the reference scores 0.5.
The reference's answers never change, so they are generated once per worker, before the search
(the study layer merges the reference into the resident model and calls ``answer_references``).

With ``scoring: parse`` the judge writes a reply instead (greedy by default, batched like the
answers) and the recipe's ``pattern`` reads the rating or verdict from it, as MT-Bench's and
Model Swarms' judges do; it suits a judge trained to reply in a format (``[[4]]``). A reply it
cannot read scores ``unparsed_score``, and each row keeps how many of its judgements were
unreadable, so every trial reports the count (``Scores.unparsed``) and a resume keeps it.
A judge behind an OpenAI-compatible endpoint (``judge_model: openai:MODEL``, judge_endpoint.py)
is always read this way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from mergekit_evolve.evaluate.example_objectives import ExampleScorer, TaskSetupError, chat_prompt, complete
from mergekit_evolve.evaluate.judge_endpoint import Endpoint
from mergekit_evolve.recipe.evolve_settings import DEFAULT_PAIRWISE_RUBRIC, DEFAULT_RUBRIC, missing_slots

FIELD = "judge_model"
UNPARSED = "unparsed"  # a parsed judge's row: how many of its judgements gave no rating


@dataclass(frozen=True)
class Reference:
    """The source whose answers a pairwise judge compares with: its name as the recipe's models have it, and
    its folder (hashed with the run's task files, so a resume notices another or a rewritten reference)."""

    name: str
    folder: Path


class JudgeScorer(ExampleScorer):
    def __init__(self, *args: Any):
        super().__init__(*args)
        remote = self.objective.remote
        self.endpoint = Endpoint(self.objective.judge_model, self.objective.endpoint) if remote else None
        self.folder = None if remote else (self.base_dir / self.objective.judge_model).resolve()
        self._loaded: tuple[Any, Any, list[int]] | None = None
        self.rubric = self._rubric()
        self.reference: Reference | None = None  # pairwise: set by whoever knows the recipe's sources
        self.reference_answers: dict[tuple[int, str], str] = {}  # by (example id, prompt): both fix an answer
        self._unparsed: dict[int, int] = {}  # parse: unread judgements by example id, of the last call
        self.values = [float(r) for r in self.objective.ratings]  # single: what each rating is worth

    @property
    def pairwise(self) -> bool:
        return self.objective.mode == "pairwise"

    def _rubric(self) -> str:
        if self.objective.rubric is not None:
            return self.objective.rubric
        if self.objective.rubric_file is None:
            return DEFAULT_PAIRWISE_RUBRIC if self.pairwise else DEFAULT_RUBRIC
        path = (self.base_dir / self.objective.rubric_file).resolve()
        if not path.is_file():
            raise TaskSetupError(f"rubric_file: no file '{self.objective.rubric_file}' (looked at {path})",
                                 field="rubric_file")
        text = path.read_text(encoding="utf-8")
        if complaint := missing_slots(text, self.objective.mode):
            raise TaskSetupError(f"rubric_file: {self.objective.rubric_file}: {complaint}", field="rubric_file")
        return text

    def check(self) -> None:
        self.check_prompts()
        if self.endpoint is not None:
            self.endpoint.check()
            return
        self.model_config(FIELD)
        tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder)
        if not self.parses:
            self.rating_ids(tokenizer)

    def rating_ids(self, tokenizer: Any) -> list[int]:
        """The token of each rating (verdict); one its tokenizer splits cannot be read off one
        next-token distribution."""
        field = "verdicts" if self.pairwise else "ratings"
        ids = []
        for rating in getattr(self.objective, field):
            tokens = tokenizer(rating, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                raise TaskSetupError(f"{field}: '{rating}' is {len(tokens)} tokens of the judge's tokenizer; each "
                                     "must be one", field=field)
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise TaskSetupError(f"{field}: {getattr(self.objective, field)} are not all different tokens of the "
                                 "judge's tokenizer (one it does not know reads as its unknown token)", field=field)
        return ids

    def files(self) -> list[Path]:
        folders = [f for f in (self.folder, self.reference and self.reference.folder) if f is not None]
        rubric = [(self.base_dir / self.objective.rubric_file).resolve()] if self.objective.rubric_file else []
        return [*super().files(), *rubric, *(p for d in folders for p in sorted(d.rglob("*")) if p.is_file())]

    @property
    def parses(self) -> bool:
        return self.objective.scoring == "parse"

    def judge(self, device: torch.device) -> tuple[Any, Any, list[int]]:
        if self._loaded is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder)
            model = transformers.AutoModelForCausalLM.from_pretrained(self.folder, dtype="auto").to(device).eval()
            self._loaded = (model, tokenizer, [] if self.parses else self.rating_ids(tokenizer))
        return self._loaded

    def references_needed(self) -> bool:
        """A pairwise judge whose reference answers are not generated yet."""
        return self.pairwise and not self.reference_answers

    def answer_references(self, model: transformers.PreTrainedModel, tokenizer: Any) -> None:
        """Generate the reference's answers to every prompt of both splits; ``model`` holds the reference's weights."""
        for examples in self.examples.values():
            ids = list(range(len(examples)))
            prompts = [e["prompt"] for e in examples]
            answers = complete(model, tokenizer, prompts, ids, self.objective.generation, self.apply_chat_template)
            self.reference_answers.update(zip(zip(ids, prompts, strict=False), answers, strict=False))

    def preference(self, text: str, device: torch.device) -> torch.Tensor:
        """The judge's next-token probabilities over the ratings (verdicts) after ``text``."""
        judge, judge_tokenizer, rating_ids = self.judge(device)
        templated = bool(judge_tokenizer.chat_template)
        inputs = judge_tokenizer(chat_prompt(judge_tokenizer, text, templated), return_tensors="pt",
                                 add_special_tokens=not templated)
        return judge(**inputs.to(judge.device)).logits[0, -1, rating_ids].float().cpu().softmax(-1)

    def replies(self, texts: list[str], ids: list[int], device: torch.device) -> list[str]:
        """What the judge writes after each text (``scoring: parse``), in batches like any answer."""
        if self.endpoint is not None:
            return self.endpoint.replies(texts, ids, self.objective.judge_generation)
        judge, judge_tokenizer, _ = self.judge(device)
        return complete(judge, judge_tokenizer, texts, ids, self.objective.judge_generation,
                        bool(judge_tokenizer.chat_template))

    def read(self, reply: str) -> float | None:
        """The rating a reply gives (pairwise: the index of the verdict it names); None when it gives none
        that fits: no match of the pattern, or a rating outside the ratings' range."""
        match = re.search(self.pattern, reply)
        if match is None:
            return None
        found = match.group(1)
        if self.pairwise:
            return float(self.objective.verdicts.index(found)) if found in self.objective.verdicts else None
        try:
            rating = float(found)
        except ValueError:
            return None
        return rating if min(self.values) <= rating <= max(self.values) else None

    @property
    def pattern(self) -> str:
        if self.objective.pattern is not None:
            return self.objective.pattern
        if self.pairwise:  # a verdict standing alone: "A", "[[A]]", "Answer A.", not the "A" of "And"
            return r"(?<![^\W_])(" + "|".join(map(re.escape, self.objective.verdicts)) + r")(?![^\W_])"
        return r"(-?\d+(?:\.\d+)?)"

    def unparsed_score(self) -> float:
        if self.objective.unparsed_score is not None:
            return self.objective.unparsed_score
        return 0.5 if self.pairwise else min(self.values)

    def judged(self, texts: list[str], ids: list[int], candidates: list[int],
               device: torch.device) -> list[float | None]:
        """Each text's judgement: single, the rating; pairwise, the preference for the answer at
        ``candidates`` (0: A, 1: B). None where a parsed reply gives none."""
        if self.parses:
            read = [self.read(r) for r in self.replies(texts, ids, device)]
            if not self.pairwise:
                return read
            return [None if v is None else float(v == c) for v, c in zip(read, candidates, strict=True)]
        if not self.pairwise:
            values = torch.tensor(self.values)
            return [float((self.preference(t, device) * values).sum()) for t in texts]
        return [float(self.preference(t, device)[c]) for t, c in zip(texts, candidates, strict=True)]

    def row_extras(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        if not self.parses:
            return {}
        # stored with the score, so a resumed run still counts them
        return {i: {UNPARSED: self._unparsed[i]} for i in ids}

    def unparsed(self, rows: list[dict[str, Any]]) -> tuple[int, int] | None:
        if not self.parses:
            return None
        return sum(int(r.get(UNPARSED, 0)) for r in rows), len(rows) * (2 if self.pairwise else 1)

    @torch.no_grad()
    def score(self, model: transformers.PreTrainedModel, tokenizer: Any, ids: list[int],
              examples: list[dict[str, Any]]) -> Sequence[float]:
        prompts = [e["prompt"] for e in examples]
        answers = complete(model, tokenizer, prompts, ids, self.objective.generation, self.apply_chat_template)
        # replace, not format: a rubric may hold other braces
        if not self.pairwise:
            texts = [self.rubric.replace("{prompt}", p).replace("{answer}", a)
                     for p, a in zip(prompts, answers, strict=True)]
            owners, candidates = ids, [0] * len(ids)
        else:
            if self.references_needed():
                raise RuntimeError(f"objective {self.objective.name}: the reference's answers were not generated")
            texts, owners, candidates = [], [], []
            for i, prompt, answer in zip(ids, prompts, answers, strict=True):
                reference = self.reference_answers[(i, prompt)]
                for a, b, candidate in ((answer, reference, 0), (reference, answer, 1)):
                    texts.append(self.rubric.replace("{prompt}", prompt).replace("{answer_a}", a)
                                 .replace("{answer_b}", b))
                    owners.append(i)
                    candidates.append(candidate)
        per_example: dict[int, list[float]] = {i: [] for i in ids}
        self._unparsed = {i: 0 for i in ids}
        for i, value in zip(owners, self.judged(texts, owners, candidates, model.device), strict=True):
            if value is None:
                self._unparsed[i] += 1
                value = self.unparsed_score()
            per_example[i].append(value)
        # pairwise: both orders' mean cancels the judge's position bias
        return [sum(per_example[i]) / len(per_example[i]) for i in ids]
