"""A rule-based reward for recipes/demo-reward.yml: the model answers each prompt, a rule scores the answer.

``score(model, tokenizer, examples)`` is what a ``python:`` objective calls: the resident model,
its tokenizer and a list of examples (the JSON objects of the recipe's ``data`` file); it returns
one float per example. Here each answer earns the share of the expected answer's characters it
gets right, position by position, so a nearly right answer counts for something (an exact-match
metric would score it 0).
"""

import torch


def _answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 10) -> list[str]:
    """Greedy answers to all prompts in one left-padded batch (the demo's prompts are a few characters long)."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(x) for x in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in encoded], device=model.device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in encoded], device=model.device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def character_match(answer: str, expected: str) -> float:
    """The share of ``expected``'s positions that ``answer`` gets right; extra characters cost as misses."""
    right = sum(a == b for a, b in zip(answer, expected, strict=False))
    return right / max(len(expected), len(answer))


@torch.no_grad()
def score(model, tokenizer, examples: list[dict]) -> list[float]:
    answers = _answers(model, tokenizer, [e["prompt"] for e in examples])
    return [character_match(a.strip(), e["answer"]) for a, e in zip(answers, examples, strict=True)]
