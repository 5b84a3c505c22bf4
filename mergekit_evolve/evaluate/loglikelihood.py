"""HFLM's loglikelihood scoring with the per-request tensor work done once per batch.

``HFLM._loglikelihood_tokens`` picks each request's continuation apart with about ten small
tensor operations (slice, argmax, compare, gather, sum, ...). On a small model those cost
more than the forward pass they follow: on the demo a quarter of a trial's time outside the
model. Here the batches are the ones HFLM builds (its ``Collator`` order, grouping and
right padding, so the model sees identical inputs), the log-softmax, argmax and gather run
once per batch, and each request keeps one slice-and-sum, so every value equals HFLM's bit
for bit (tests/evaluate/test_prepared_requests.py compares them with ``lm_eval.evaluate``).
Only the causal backend with a fixed batch size takes this path; the rest stays HFLM's.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.utils import Collator

LOG = logging.getLogger(__name__)
Request = tuple[tuple[str, str], list[int], list[int]]
# get_cache only reshapes the logits it is given; the positions are taken from the batch here
_NO_LOGITS = torch.empty(1, 0, 0)


def applies(lm: Any, override_bs: int | None) -> bool:
    return lm.backend == "causal" and isinstance(lm.batch_size, int) and override_bs is None


def loglikelihood_tokens(lm: Any, requests: list[Request]) -> list[tuple[float, bool]]:
    """``(log-probability of the continuation, whether greedy decoding gives it)`` per request."""
    order = Collator(
        requests,
        sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])),  # HFLM's order
        group_by="contexts" if lm.logits_cache else None,
        group_fn=lambda req: req[-2] + req[-1][:-1],  # one-token continuations share a row
    )
    results: list[tuple[float, bool]] = []
    for chunk in order.get_batched(n=lm.batch_size):
        inputs = []
        for _, context, continuation in chunk:
            if len(context) + len(continuation) > lm.max_length + 1:
                LOG.warning("context + continuation exceed the model's %d tokens: truncated from the left",
                            lm.max_length)
            inputs.append((context + continuation)[-(lm.max_length + 1) :][:-1])
        lengths = [len(x) for x in inputs]
        padded = max(lengths)
        # right-padded with zeros, as HFLM's pad_and_concat, in one tensor instead of one a row
        batch = torch.tensor([x + [0] * (padded - len(x)) for x in inputs], dtype=torch.long, device=lm.device)
        logits = F.log_softmax(lm.model_call(batch), dim=-1, dtype=lm.softmax_dtype)
        # per scored token: batch row, position of its log-prob, position of its greedy check, token
        rows: list[int] = []
        scored: list[int] = []
        checked: list[int] = []
        tokens_out: list[int] = []
        spans: list[tuple[Any, int, int]] = []
        for row, ((request_str, context, continuation), length) in enumerate(zip(chunk, lengths, strict=False)):
            end = length + (logits.shape[1] - padded)  # the row's last input position, + 1
            start = end - len(continuation)
            for cached_str, cont, _ in order.get_cache(  # the request and its repeats (one-token grouping)
                req_str=request_str, cxt_toks=context, cont_toks=continuation, logits=_NO_LOGITS
            ):
                n = len(cont)
                # as HFLM: log-probs gathered from the first n positions of the row's continuation
                # window, the greedy check against its last n (they differ only for grouped requests)
                rows += [row] * n
                scored += range(start, start + n)
                checked += range(end - n, end)
                tokens_out += cont
                spans.append((cached_str, len(tokens_out) - n, len(tokens_out)))
        index = torch.tensor(rows, device=logits.device)
        wanted = torch.tensor(tokens_out, device=logits.device)
        log_probs = logits[index, torch.tensor(scored, device=logits.device), wanted]
        greedy = logits[index, torch.tensor(checked, device=logits.device)].argmax(dim=-1) == wanted
        misses = (~greedy).cumsum(0).tolist()
        for request_str, a, b in spans:
            answer = (float(log_probs[a:b].sum()), misses[b - 1] == (misses[a - 1] if a else 0))
            results.append(answer)
            if request_str is not None:  # loglikelihood_rolling caches per document instead
                lm.cache_hook.add_partial("loglikelihood", request_str, answer)
    return order.get_original(results)
