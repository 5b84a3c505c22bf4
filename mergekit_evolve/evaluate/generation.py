"""HFLM's greedy ``generate_until`` as one plain decoding loop per batch.

``HFLM.generate_until`` hands each batch to ``model.generate``, whose per-step machinery (logits
processors, stopping criteria that decode every sequence's tail through the tokenizer, generation
config checks) costs more than the forward pass on a small model. Here the batches are HFLM's own
(its ``Collator`` order and grouping, its left-padded ``tok_batch_encode``), each step is one
forward over the KV cache with the positions ``generate`` computes from the attention mask, the
next token is the argmax, and a sequence is done at the tokenizer's end-of-sequence token or when
its decoded continuation holds a stop sequence; the batch stops when every sequence is done or at
``max_gen_toks``. The text is then cut as HFLM cuts it, so the strings are HFLM's
(tests/evaluate/test_generation.py compares them). Sampling, beam search, a generation config that
processes logits, and thinking-token models stay on HFLM's path.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from transformers import DynamicCache, GenerationConfig

# generation-config fields that change greedy decoding; any value but the default leaves it to HFLM
_PROCESSING = ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
               "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "min_length", "min_new_tokens",
               "sequence_bias", "encoder_repetition_penalty", "exponential_decay_length_penalty", "num_beams",
               "renormalize_logits")
_DEFAULTS = GenerationConfig()


def _greedy(kwargs: dict[str, Any]) -> bool:
    """Whether HFLM would decode greedily with these (normalised, until/max_gen_toks removed) kwargs."""
    rest = {k: v for k, v in kwargs.items() if k not in ("do_sample", "temperature")}
    return not rest and not kwargs.get("do_sample") and not kwargs.get("temperature")


def applies(lm: Any, requests: list[Any]) -> bool:
    if lm.backend != "causal" or not isinstance(lm.batch_size, int) or lm.think_end_token is not None:
        return False
    config = lm.model.generation_config
    if any(getattr(config, name, None) != getattr(_DEFAULTS, name, None) for name in _PROCESSING):
        return False
    for request in requests:
        kwargs = normalize_gen_kwargs(dict(request.args[1]), lm.max_gen_toks)
        kwargs.pop("until", None), kwargs.pop("max_gen_toks")
        if not _greedy(kwargs) or "max_length" in kwargs:
            return False
    return True


def _cache_argument(model: Any) -> str:
    # transformers renamed ``past_key_values`` to ``cache`` during 5.x (the old name goes in 5.40)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _eos_ids(lm: Any) -> set[int]:
    ids = lm.model.generation_config.eos_token_id
    return set(ids if isinstance(ids, list) else [] if ids is None else [ids])


@torch.no_grad()
def _decode(lm: Any, ids: torch.Tensor, mask: torch.Tensor, max_new: int, stops: list[str]) -> list[list[int]]:
    """Greedy continuations of a left-padded batch, each ending where it is done (or at ``max_new``)."""
    model, eos = lm.model, _eos_ids(lm)
    positions = mask.long().cumsum(-1) - 1
    positions.masked_fill_(mask == 0, 1)
    cache = {_cache_argument(model): DynamicCache(config=model.config)}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **cache)
    pad = lm.tokenizer.pad_token_id
    tokens: list[list[int]] = [[] for _ in range(ids.shape[0])]
    done = [False] * ids.shape[0]
    for step in range(max_new):
        chosen = out.logits[:, -1].float().argmax(-1)
        for row, token in enumerate(chosen.tolist()):
            if done[row]:
                continue
            tokens[row].append(token)
            # a stop sequence ends the text wherever it appears, so the decoded tail is checked whole
            done[row] = token in eos or any(s and s in lm.tok_decode(tokens[row]) for s in stops)
        if all(done) or step == max_new - 1:
            break
        # a finished sequence is fed padding, as ``generate`` does, so the others see the same batch
        chosen = torch.tensor([pad if d else t for d, t in zip(done, chosen.tolist(), strict=False)], device=ids.device)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions, use_cache=True, **cache)
    return tokens


def generate_until(lm: Any, requests: list[Any]) -> list[str]:
    """HFLM's ``generate_until`` results for greedy requests (see ``applies``)."""
    memo = lm.__dict__.setdefault("context_lengths", {})

    def length(context: str) -> int:  # HFLM's sort key tokenises every context on every call
        if context not in memo:
            memo[context] = len(lm.tok_encode(context))
        return memo[context]

    order = Collator([r.args for r in requests], sort_fn=lambda req: (-length(req[0]), req[0]),
                     group_by="gen_kwargs", group_fn=lambda x: x[1])
    eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
    results: list[str] = []
    for chunk in order.get_batched(n=lm.batch_size):
        contexts, all_kwargs = zip(*chunk, strict=True)
        kwargs = normalize_gen_kwargs(all_kwargs[0], lm.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen_toks = kwargs.pop("max_gen_toks")
        ids, mask = lm.tok_batch_encode(list(contexts), left_truncate_len=lm.max_length - max_gen_toks,
                                        truncation=lm.truncation)
        for tokens, context in zip(_decode(lm, ids.to(lm.device), mask.to(lm.device), max_gen_toks, until), contexts,
                                   strict=False):
            text = postprocess_generated_text(generation=lm.tok_decode(tokens), stop=until, think_end_token=None)
            results.append(text)
            lm.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
    return order.get_original(results)
