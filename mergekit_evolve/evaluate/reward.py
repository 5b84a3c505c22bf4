"""``reward_model:`` objectives: the resident model answers each prompt, a local reward model scores the answer.

The reward model is any ``AutoModelForSequenceClassification`` folder; it is loaded once per
worker, on the resident model's device, the first time it is needed. Its score is the logit of
its single output (or of the output ``label`` names). Each answer is scored alone (no padding,
so a reward model without a pad token works), as one user/assistant exchange of the reward
model's chat template when it has one, else as the prompt followed by the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from mergekit_evolve.evaluate.example_objectives import ExampleScorer, TaskSetupError, complete

FIELD = "reward_model"


class RewardScorer(ExampleScorer):
    def __init__(self, *args: Any):
        super().__init__(*args)
        self.folder = (self.base_dir / self.objective.reward_model).resolve()
        self._loaded: tuple[Any, Any] | None = None

    def check(self) -> None:
        self.check_prompts()
        config = self.model_config(FIELD)
        self.label_index(config)

    def label_index(self, config: transformers.PretrainedConfig) -> int:
        label = self.objective.label
        if label is None:
            if config.num_labels != 1:
                raise TaskSetupError(f"label: the reward model has {config.num_labels} outputs "
                                     f"{list(config.label2id)}; name the reward's", field="label")
            return 0
        if isinstance(label, str):
            if label not in config.label2id:
                raise TaskSetupError(f"label: the reward model has no label '{label}'; it has {list(config.label2id)}",
                                     field="label")
            return int(config.label2id[label])
        if not 0 <= label < config.num_labels:
            raise TaskSetupError(f"label: the reward model has {config.num_labels} outputs; {label} is not one of them",
                                 field="label")
        return label

    def files(self) -> list[Path]:
        return [*super().files(), *(p for p in sorted(self.folder.rglob("*")) if p.is_file())]

    def reward_model(self, device: torch.device) -> tuple[Any, Any]:
        if self._loaded is None:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                self.folder, dtype="auto").to(device)
            self._loaded = (model.eval(), transformers.AutoTokenizer.from_pretrained(self.folder))
        return self._loaded

    @torch.no_grad()
    def score(self, model: transformers.PreTrainedModel, tokenizer: Any, ids: list[int],
              examples: list[dict[str, Any]]) -> Sequence[float]:
        prompts = [e["prompt"] for e in examples]
        answers = complete(model, tokenizer, prompts, ids, self.objective.generation, self.apply_chat_template)
        reward, reward_tokenizer = self.reward_model(model.device)
        index = self.label_index(reward.config)
        values = []
        for prompt, answer in zip(prompts, answers, strict=False):
            if reward_tokenizer.chat_template:
                text = reward_tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False)
                inputs = reward_tokenizer(text, return_tensors="pt", add_special_tokens=False)
            else:
                inputs = reward_tokenizer(prompt + answer, return_tensors="pt")
            logits = reward(**inputs.to(reward.device)).logits
            values.append(float(logits[0, index]))
        return values
