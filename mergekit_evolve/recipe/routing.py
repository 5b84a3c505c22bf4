"""Data flow space (DFS): a searched path through the decoder layers of several models.

Sakana AI's Evolutionary Model Merge (arXiv 2403.13187, section 3.2) lays out the M layers of
all routed models in order, repeats that layout r times (T = M x r slots) and evolves one
continuous indicator per slot: slot i is on when its value is > 0, and the path is
``[i mod M for i in range(T) if I[i] > 0]``. The first model (A) supplies embeddings, final
norm, head and tokenizer, and its first and last layers always open and close the path.

A recipe asks for this with a top-level block instead of ``models``/``slices``::

    merge_method: passthrough
    routing:
      models: [A, B]        # A first; all must share hidden size and layer shapes
      repeats: 3            # r
      scales: [0.5, 2.0]    # search the hop scales W in this range; omit for none
      scale_form: matrix    # matrix: the paper's W (M x M); slot: one scale per slot, for very large M
      min_layers: 32        # path length, forced first and last layers included
      max_layers: 64
      num_layers: {B: 32}   # only for models whose config.json is not reachable (dry runs)
      scale_filter: down_proj   # optional: the tensor the scales multiply (default: per architecture)

Search dimensions (all floats, so CMA-ES can search them as in the paper):

- ``routing.r{rep}.{model}.L{layer}`` in [-1, 1], one per slot: the indicator;
- with ``scales`` and ``scale_form: matrix`` (the default), the paper's W: one scale
  ``routing.W.{from}.{to}`` per ordered pair of the M layers (``{model}.L{layer}`` each); the hop
  from layer i to layer j is scaled by W_ij, whichever slots they sit in; plus
  ``routing.W.embed.{A.L0}`` for the hop from the embedding into A's forced first layer;
- with ``scale_form: slot``, ``routing.r{rep}.{model}.L{layer}.scale``, one per slot: the scale
  of the hop *into* that slot; plus ``routing.first.scale`` and ``routing.last.scale`` for the
  hops into A's forced first and last layers.

Their ``init`` is the paper's: every indicator 0 (off: a slot is on when I > 0) except model A's
layers in the first repetition at 0.2 (2 sigma of the paper's sigma0 = 0.1), scales 1; so the
first trial of a search is A itself, and a search started at the init point (``sampler: cma``)
is one step from switching any slot.

Length limits: a decoded path outside [min_layers, max_layers] is repaired deterministically
(too long: keep the slots with the largest indicator values; too short: also open the closed
slots with the largest values), so every point of the box is a valid candidate.

Where each scale lands (the released EvoLLM-JP 10B model multiplies the previous hop's MLP
output by the scale of the hop, before it joins the residual stream): the scale of hop k >= 1
becomes a passthrough ``scale`` parameter, filtered to the architecture's MLP output tensor
(``SCALE_TENSORS``: ``down_proj`` for Llama-like families, ``mlp.c_proj`` weight and bias for
GPT-2), on the slice of hop k - 1. Scaling those tensors scales exactly what the MLP adds to the
residual stream. Families whose MLP output is re-normalised before it joins (Gemma 2 and 3:
``post_feedforward_layernorm``) or is not a separate tensor are refused with their name.
Hop 0's input is the embedding (the released model scales it too): its scale becomes a global
passthrough ``scale`` filtered to the embedding tensors (``EMBED_TENSORS``). A model whose head
is tied to its embedding gets no such scale (it would scale the logits as well), nor does a
family the table lacks; ``embed_filter`` names the tensors or, as ``[]``, turns it off. A scale
of exactly 1 is left out of the config.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
import transformers
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergekit_evolve.recipe.search_space import Dimension, SearchSpace
from mergekit_evolve.recipe.yaml_lines import LocatedYaml
from mergekit_evolve.runfolder import BEST_DIR

KEY = "routing"
INDICATOR_RANGE = (-1.0, 1.0)
# the paper's init: I = 0 (off) except A's first-repetition layers at 2 sigma0 = 0.2 (on), model A itself
ON, OFF = 0.2, 0.0
# What each model_type's layer adds to the residual stream from its MLP, as a passthrough filter
# (scaling it scales that output exactly: no bias, or the bias matched too).
SCALE_TENSORS = {
    "llama": "down_proj", "mistral": "down_proj", "qwen2": "down_proj", "qwen3": "down_proj", "phi3": "down_proj",
    "gpt2": "mlp.c_proj",
}
# The tensors whose product is the hidden state entering the first layer (GPT-2 adds positions).
EMBED_TENSORS = {
    "llama": ["embed_tokens"], "mistral": ["embed_tokens"], "qwen2": ["embed_tokens"], "qwen3": ["embed_tokens"],
    "phi3": ["embed_tokens"], "gpt2": ["wte", "wpe"],
}
UNSCALABLE = {
    "gemma2": "its post_feedforward_layernorm re-normalises the MLP output before it joins the residual stream",
    "gemma3": "its post_feedforward_layernorm re-normalises the MLP output before it joins the residual stream",
    "gemma3_text": "its post_feedforward_layernorm re-normalises the MLP output before it joins the residual stream",
}
# Config keys that must agree between routed models for their layers to stack in one model.
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim")


class Routing(BaseModel):
    """The ``routing:`` block of a recipe."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1, description="routed models; the first supplies embeddings, head, tokenizer")
    repeats: int = Field(default=1, description="r: how many times the layers of all models are laid out")
    scales: tuple[float, float] | None = Field(default=None, description="range of the per-hop scales; none: no scales")
    scale_form: Literal["matrix", "slot"] = Field(
        default="matrix", description="matrix: the paper's W, a scale per (from layer, to layer); slot: one per slot"
    )
    min_layers: int | None = Field(default=None, ge=1,
                                   description="fewest layers in the path (forced first/last included)")
    max_layers: int | None = Field(default=None, ge=1,
                                   description="most layers in the path (forced first/last included)")
    num_layers: dict[str, int] = Field(default_factory=dict, description="layer counts of models without a config.json")
    scale_filter: str | None = Field(
        default=None,
        description="the tensor the scales multiply; default: the architecture's MLP output (SCALE_TENSORS)",
    )
    embed_filter: list[str] | None = Field(
        default=None, description="the embedding tensors the first hop's scale multiplies; default: the architecture's "
        "(EMBED_TENSORS), none when A's head is tied to its embedding; [] for no scale on that hop"
    )

    @field_validator("repeats")
    @classmethod
    def _repeats(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"repeats (r) must be at least 1, got {v}")
        return v

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is None:
            return v
        lo, hi = v
        if lo <= 0:
            raise ValueError(
                f"the scale range [{lo}, {hi}] must be positive: a scale multiplies an MLP output before it joins "
                "the residual stream, so 0 would delete that MLP and a negative value flip its sign"
            )
        if not lo < hi:
            raise ValueError(f"the scale range [{lo}, {hi}] is empty: the low end must be below the high end")
        return v

    @field_validator("num_layers")
    @classmethod
    def _counts(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {m: n for m, n in v.items() if n < 1}
        if bad:
            raise ValueError(f"layer counts must be positive: {bad}")
        return v

    # --- the layout (valid once every model has a layer count, see prepare_routing) ---

    def layers_of(self, model: str) -> int:
        return self.num_layers[model]

    @property
    def width(self) -> int:
        """M: the layers of all models laid out once."""
        return sum(self.layers_of(m) for m in self.models)

    @property
    def slots(self) -> int:
        """T = M x r."""
        return self.width * self.repeats

    def slot_layer(self, slot: int) -> tuple[int, int]:
        """(model index, layer) of a slot."""
        j = slot % self.width
        for i, m in enumerate(self.models):
            if j < self.layers_of(m):
                return i, j
            j -= self.layers_of(m)
        raise AssertionError("unreachable")

    def global_layer(self, model_index: int, layer: int) -> int:
        """The index in [0, M) of a model's layer in the layout (W's row or column)."""
        return sum(self.layers_of(m) for m in self.models[:model_index]) + layer

    @property
    def length_limits(self) -> tuple[int, int]:
        return self.min_layers or 2, self.max_layers or self.slots + 2


@dataclass(frozen=True)
class Hop:
    """One layer of the path and the scale of the hop into it (applied to the previous hop's MLP output; hop 0's to
    the embedding)."""

    model: str
    layer: int
    scale: float = 1.0


# --- recipe side: validate, fill in layer counts, make dimensions ---------------------------


def read_config(model: str) -> Any | None:
    """The model's transformers config from a local folder or the Hugging Face cache; None if neither has it.

    Never downloads. Raises ValueError for a config.json transformers cannot read.
    """
    try:
        return transformers.AutoConfig.from_pretrained(model.partition("+")[0], local_files_only=True)
    except OSError:
        return None


def prepare_routing(doc: LocatedYaml, template: dict[str, Any], resolve: Callable[[str], str]) -> Routing:
    """Validate ``template['routing']``, resolve its model paths and store every layer count in it.

    After this the block in the template is self-contained: compiling a point reads no files.
    """
    raw = template[KEY]
    for key in ("models", "slices", "modules", "base_model"):
        if key in template:
            raise doc.error((key,), f"'{key}' cannot be used with 'routing:': "
                                    "the routing block names the models and builds the slices")
    if template.get("merge_method") != "passthrough":
        raise doc.error(("merge_method",), "a 'routing:' recipe needs merge_method: passthrough "
                                           "(each hop is one passthrough slice)")
    try:
        block = Routing.model_validate(raw)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, (KEY,) + tuple(err["loc"])))
        raise doc.error((KEY,) + tuple(err["loc"]), f"{where}: {err['msg'].removeprefix('Value error, ')}") from None
    written = list(block.models)
    unknown = set(block.num_layers) - set(written)
    if unknown:
        raise doc.error((KEY, "num_layers"),
                        f"routing.num_layers names {sorted(unknown)}, which are not in routing.models")
    resolved = [resolve(m) for m in written]
    counts: dict[str, int] = {}
    shapes: dict[str, dict[str, Any]] = {}
    tied = False  # A's head is its embedding (tie_word_embeddings)
    for i, (w, m) in enumerate(zip(written, resolved, strict=False)):
        try:
            cfg = read_config(m)
        except ValueError as e:  # unknown model_type and the like
            raise doc.error((KEY, "models", i), f"cannot read the config of routed model '{w}': {e}") from None
        given = block.num_layers.get(w)
        if cfg is not None:
            n = cfg.num_hidden_layers
            if given is not None and given != n:
                raise doc.error((KEY, "num_layers", w),
                                f"routing.num_layers gives {w} {given} layers, its config.json has {n}")
            shapes[w] = {k: getattr(cfg, k, None) for k in SHAPE_KEYS}
            tied = tied or (i == 0 and bool(getattr(cfg, "tie_word_embeddings", False)))
        elif given is not None:
            n = given
        else:
            raise doc.error(
                (KEY, "models", i),
                f"no config.json for routed model '{w}' (not a local folder, not in the Hugging Face cache); "
                f"download it, or give its layer count in routing.num_layers",
            )
        counts[m] = n
    _check_shapes(doc, shapes, written)
    # None: no config readable (a dry run on layer counts), taken for the Llama family
    family = next((s["model_type"] for s in shapes.values() if s.get("model_type")), None)
    scale_filter = block.scale_filter
    if block.scales and scale_filter is None:
        scale_filter = _scale_tensor(doc, family)
    embed_filter = block.embed_filter
    if not block.scales:
        embed_filter = []
    elif embed_filter is None:
        embed_filter = [] if tied else EMBED_TENSORS.get(family or "llama", [])
    if embed_filter and "scale" in (template.get("parameters") or {}):
        raise doc.error(("parameters", "scale"), "parameters.scale cannot be used with routing.scales: "
                                                 "the scale of the hop from the embedding is the embedding's "
                                                 "passthrough scale")
    block = block.model_copy(update={"models": resolved, "num_layers": counts, "scale_filter": scale_filter,
                                     "embed_filter": embed_filter})
    lo, hi = block.length_limits
    if hi < 2:
        raise doc.error((KEY, "max_layers"), f"routing.max_layers {hi} is below 2: "
                                             f"the first and last layers of {written[0]} are always in the path")
    if lo > block.slots + 2:
        raise doc.error(
            (KEY, "min_layers"),
            f"routing.min_layers {lo} can never be reached: {block.slots} slots ({block.width} layers x "
            f"{block.repeats} repeats) plus the 2 forced layers make at most {block.slots + 2}",
        )
    if lo > hi:
        raise doc.error((KEY, "min_layers"), f"routing.min_layers {lo} is above routing.max_layers {hi}: no path fits")
    template[KEY] = block.model_dump(mode="json")
    return block


def _check_shapes(doc: LocatedYaml, shapes: dict[str, dict[str, Any]], written: list[str]) -> None:
    """Layers stack only between models of one architecture and width."""
    items = list(shapes.items())
    for key in SHAPE_KEYS:
        values = {m: s[key] for m, s in items if s[key] is not None}
        if len(set(values.values())) > 1:
            other = next(m for m in values if values[m] != values[items[0][0]])
            raise doc.error(
                (KEY, "models", written.index(other)),
                f"routed models must share {key}: " + ", ".join(f"{m} has {v}" for m, v in values.items()),
            )


def _scale_tensor(doc: LocatedYaml, family: str | None) -> str:
    """The passthrough filter that scales what a layer's MLP adds to the residual stream, for this family."""
    if family is None:
        return "down_proj"
    if family in UNSCALABLE:
        raise doc.error((KEY, "scales"), f"routing.scales cannot be applied to {family} models: "
                                         f"{UNSCALABLE[family]}, so scaling a tensor does not scale it; "
                                         "drop routing.scales (a path without W)")
    if family not in SCALE_TENSORS:
        raise doc.error(
            (KEY, "scales"),
            f"routing.scales does not know which tensor of a {family} layer carries its MLP output into the residual "
            f"stream (known: {', '.join(sorted(SCALE_TENSORS))}); name it in routing.scale_filter, "
            "or drop routing.scales",
        )
    return SCALE_TENSORS[family]


def _labels(block: Routing) -> list[str]:
    """Short model names for dimension names: folder names (a run's ``best/`` is named by its run)."""
    names = []
    for m in block.models:
        parts = m.rstrip("/").split("/")
        names.append(parts[-2] if parts[-1] == BEST_DIR and len(parts) > 1 else os.path.basename(m.rstrip("/")))
    return [n if names.count(n) == 1 else f"m{i}" for i, n in enumerate(names)]


def slot_names(block: Routing) -> list[str]:
    labels = _labels(block)
    digits = len(str(max(block.layers_of(m) for m in block.models) - 1))
    out = []
    for slot in range(block.slots):
        i, layer = block.slot_layer(slot)
        out.append(f"{KEY}.r{slot // block.width}.{labels[i]}.L{layer:0{digits}d}")
    return out


FIRST_SCALE, LAST_SCALE = f"{KEY}.first.scale", f"{KEY}.last.scale"


def layer_names(block: Routing) -> list[str]:
    """``{model}.L{layer}`` for the M layers in layout order (W's rows and columns)."""
    return [name.split(".", 2)[2] for name in slot_names(block)[: block.width]]


def w_name(block: Routing, names: list[str], src: int, dst: int) -> str:
    """W's dimension for the hop from layout layer ``src`` to layout layer ``dst``."""
    return f"{KEY}.W.{names[src]}.{names[dst]}"


def embed_name(block: Routing) -> str | None:
    """The dimension of the hop from the embedding into A's first layer; None when it is not scaled."""
    if not block.scales or not block.embed_filter:
        return None
    return FIRST_SCALE if block.scale_form == "slot" else f"{KEY}.W.embed.{layer_names(block)[0]}"


def scale_names(block: Routing) -> list[str]:
    if not block.scales:
        return []
    first = [n] if (n := embed_name(block)) else []
    if block.scale_form == "slot":
        return first + [f"{n}.scale" for n in slot_names(block)] + [LAST_SCALE]
    names = layer_names(block)
    return first + [w_name(block, names, i, j) for i in range(block.width) for j in range(block.width)]


def add_dimensions(space: SearchSpace, block: Routing) -> None:
    """The indicator (and scale) dimensions; their init is the paper's, which decodes to model A."""
    a_layers = block.layers_of(block.models[0])
    for slot, name in enumerate(slot_names(block)):
        i, layer = block.slot_layer(slot)
        on = slot < block.width and i == 0 and 0 < layer < a_layers - 1
        space.dimensions[name] = Dimension(name, "float", low=INDICATOR_RANGE[0], high=INDICATOR_RANGE[1],
                                           init=ON if on else OFF)
    if block.scales:
        lo, hi = block.scales
        init = 1.0 if lo <= 1.0 <= hi else None
        for scale in scale_names(block):
            space.dimensions[scale] = Dimension(scale, "float", low=lo, high=hi, init=init)


# --- point side: decode and compile ---------------------------------------------------------


def open_slots(block: Routing, indicator: list[float]) -> list[int]:
    """Slots with a positive indicator, repaired to the length limits (forced layers count 2)."""
    lo, hi = block.length_limits
    chosen = [s for s, v in enumerate(indicator) if v > 0]
    by_value = sorted(range(len(indicator)), key=lambda s: (-indicator[s], s))
    if len(chosen) > hi - 2:
        chosen = sorted(by_value[: hi - 2])
    elif len(chosen) < lo - 2:
        extra = [s for s in by_value if indicator[s] <= 0][: lo - 2 - len(chosen)]
        chosen = sorted(chosen + extra)
    return chosen


def decode(block: Routing, point: dict[str, Any]) -> list[Hop]:
    """The path a point stands for: A's first layer, the open slots in order, A's last layer."""
    names = slot_names(block)
    a = block.models[0]
    last = (0, block.layers_of(a) - 1)
    slots: list[int | None] = [None, *open_slots(block, [point[n] for n in names]), None]  # None: A's forced layers
    path = [(0, 0)] + [block.slot_layer(s) for s in slots[1:-1] if s is not None] + [last]
    layers = layer_names(block)
    hops = [Hop(a, 0, float(point[embed]) if (embed := embed_name(block)) else 1.0)]
    for k in range(1, len(path)):
        (i, layer), scale = path[k], 1.0
        if block.scales and block.scale_form == "matrix":
            src, dst = block.global_layer(*path[k - 1]), block.global_layer(i, layer)
            scale = float(point[w_name(block, layers, src, dst)])
        elif block.scales:
            scale = float(point[LAST_SCALE if slots[k] is None else f"{names[slots[k]]}.scale"])
        hops.append(Hop(block.models[i], layer, scale))
    return hops


def compile_path(block: Routing, hops: list[Hop]) -> list[dict[str, Any]]:
    """One passthrough slice per hop; the scale of hop k multiplies hop k-1's MLP output projection."""
    slices = []
    for k, hop in enumerate(hops):
        source: dict[str, Any] = {"model": hop.model, "layer_range": [hop.layer, hop.layer + 1]}
        nxt = hops[k + 1].scale if k + 1 < len(hops) else 1.0
        if nxt != 1.0:
            source["parameters"] = {"scale": [{"filter": block.scale_filter, "value": nxt}]}
        slices.append({"sources": [source]})
    return slices


def routed_config(config: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """Replace a (prepared) ``routing:`` block by the passthrough config of ``point``'s path."""
    block = Routing.model_validate(config.pop(KEY))
    config["base_model"] = block.models[0]  # output config, embeddings and tokenizer come from A
    hops = decode(block, point)
    config["slices"] = compile_path(block, hops)
    if hops[0].scale != 1.0:  # the embedding is no slice's tensor: a global parameter, filtered to it
        config["parameters"] = {**(config.get("parameters") or {}),
                                "scale": [{"filter": f, "value": hops[0].scale} for f in block.embed_filter]}
    return config

