"""``judge_model:`` objectives: the resident model answers each prompt, a local causal LM rates the answer.

The judge reads the recipe's rubric with the prompt and the answer filled in (as one user turn of
its chat template when it has one) and the score is its expected rating: the ratings (``1`` to
``5`` by default, each one token of the judge's tokenizer) weighted by the judge's next-token
probabilities renormalised over them. No text is sampled from the judge, so a score is
deterministic and graded (a 3.6 tells more than a 4). Loaded once per worker, on the resident
model's device, when first needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from mergekit_evolve.evaluate.example_objectives import ExampleScorer, TaskSetupError, chat_prompt, complete

FIELD = "judge_model"


class JudgeScorer(ExampleScorer):
    def __init__(self, *args: Any):
        super().__init__(*args)
        self.folder = (self.base_dir / self.objective.judge_model).resolve()
        self._loaded: tuple[Any, Any, list[int]] | None = None

    def check(self) -> None:
        self.check_prompts()
        self.model_config(FIELD)
        self.rating_ids(transformers.AutoTokenizer.from_pretrained(self.folder))

    def rating_ids(self, tokenizer: Any) -> list[int]:
        """The token of each rating; a rating its tokenizer splits cannot be read off one next-token distribution."""
        ids = []
        for rating in self.objective.ratings:
            tokens = tokenizer(rating, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                raise TaskSetupError(f"ratings: '{rating}' is {len(tokens)} tokens of the judge's tokenizer; each rating "
                                     "must be one", field="ratings")
            ids.append(tokens[0])
        return ids

    def files(self) -> list[Path]:
        return [*super().files(), *(p for p in sorted(self.folder.rglob("*")) if p.is_file())]

    def judge(self, device: torch.device) -> tuple[Any, Any, list[int]]:
        if self._loaded is None:
            tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder)
            model = transformers.AutoModelForCausalLM.from_pretrained(self.folder, dtype="auto").to(device).eval()
            self._loaded = (model, tokenizer, self.rating_ids(tokenizer))
        return self._loaded

    @torch.no_grad()
    def score(self, model: transformers.PreTrainedModel, tokenizer: Any, ids: list[int],
              examples: list[dict[str, Any]]) -> Sequence[float]:
        prompts = [e["prompt"] for e in examples]
        answers = complete(model, tokenizer, prompts, ids, self.objective.generation, self.apply_chat_template)
        judge, judge_tokenizer, rating_ids = self.judge(model.device)
        values = torch.tensor([float(r) for r in self.objective.ratings])
        scores = []
        for prompt, answer in zip(prompts, answers, strict=True):
            # replace, not format: a rubric may hold other braces
            text = self.objective.rubric.replace("{prompt}", prompt).replace("{answer}", answer)
            templated = bool(judge_tokenizer.chat_template)
            inputs = judge_tokenizer(chat_prompt(judge_tokenizer, text, templated), return_tensors="pt",
                                     add_special_tokens=not templated)
            logits = judge(**inputs.to(judge.device)).logits[0, -1, rating_ids].float().cpu()
            scores.append(float((logits.softmax(-1) * values).sum()))
        return scores
