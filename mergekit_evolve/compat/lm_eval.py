"""lm-eval's private surface this package relies on (tested against the installed version in tests/compat/)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import lm_eval.utils
import torch
from lm_eval.models.huggingface import HFLM

_original_apply_template = lm_eval.utils.apply_template
_compile = functools.lru_cache(maxsize=4096)(lm_eval.utils.env.from_string)


def _apply_compiled_template(template: str, doc: dict) -> str:
    return _compile(template).render(**doc)


@contextlib.contextmanager
def compiled_templates() -> Iterator[None]:
    """lm-eval compiles a task's Jinja prompt template anew for every document on every call
    (a quarter of a tiny model's evaluation time); inside this block each template is compiled
    once per process. Same environment, same rendering: only the repeated compilation goes."""
    lm_eval.utils.apply_template = _apply_compiled_template
    try:
        yield
    finally:
        lm_eval.utils.apply_template = _original_apply_template


def set_task_instances(task: Any, instances: list[Any]) -> None:
    """Point a task's filters (they read ``task.instances``) at these requests."""
    task._instances = instances


class HookedHFLM(HFLM):
    """``HFLM`` whose private steps call public methods a subclass may override."""

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return super()._encode_pair(context, continuation)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return self.encode_pair(context, continuation)

    def loglikelihood_tokens(self, requests: list[Any], override_bs: int | None = None) -> list[tuple[float, bool]]:
        return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens(requests, override_bs)

    def model_call(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's logits for a batch of token ids, as HFLM computes them."""
        return self._model_call(batch)
