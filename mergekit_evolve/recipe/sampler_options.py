"""Typed ``evolve.sampler_options``: one model per sampler, chosen by ``evolve.sampler``.

Optuna's own samplers take their constructor's keyword arguments as they are (``OptunaOptions``);
cma, cycleqd and swarm are this package's, so their options are checked (and documented) here.
The recipe is validated once, into the model that fits its sampler.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # preset name -> option values it stands for (options the recipe writes still win)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @model_validator(mode="after")
    def _apply_preset(self) -> _Options:
        preset = getattr(self, "preset", None)
        for key, value in self.PRESETS.get(preset or "", {}).items():
            if key not in self.model_fields_set:
                # not recorded as set: given() keeps writing just `preset: ...`
                object.__setattr__(self, key, value)
        return self

    def given(self) -> dict[str, Any]:
        """The options the recipe wrote (defaults left out), as a recipe would write them."""
        return self.model_dump(mode="json", exclude_unset=True)


class OptunaOptions(_Options):
    """Keyword arguments of one of Optuna's samplers (cmaes, tpe, gp, random, nsga2), passed as written."""

    model_config = ConfigDict(extra="allow")

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PyCmaOptions(_Options):
    """pycma's CMA-ES, generation by generation (``sampler: cma``)."""

    sigma0: float = Field(default=1 / 6, gt=0,
                          description="initial step size in units of each dimension's range (Sakana: 1/6)")
    popsize: int | None = Field(default=None, ge=2, description="points per generation; default pycma's 4 + 3 ln(n)")
    restarts: int = Field(default=0, ge=0, description="restarts when pycma's stop criteria fire (0: keep sampling)")
    restart_strategy: Literal["ipop", "bipop"] = Field(
        default="ipop",
        description="ipop: popsize x incpopsize each restart; bipop: interleave small-population local runs",
    )
    incpopsize: float = Field(default=2.0, ge=1.0)


class CycleQDOptions(_Options):
    """CycleQD: one MAP-Elites archive per objective, the quality task cycling (``sampler: cycleqd``).

    Two sets of defaults. This package's (no preset) suit short searches of tens of trials:
    several children a generation, a wide crossover (sigma 0.3) and a strong SVD mutation
    (w ~ U[0, 2]), bins over (0, 1). ``preset: paper`` is the released code's settings for the
    paper's method (SakanaAI/CycleQD, ``mutation=svd_uniform_noise``, ``sampling=elite_sampling``):
    one child a generation, crossover weights N(1, 0.01^2), singular values scaled by U[1, 1.1]
    (the code's additive 0.1 x U[0, 1] x S), elite sampling 0.5 + 0.8 norm, and the paper's bins
    from 0.85 x the weakest expert to 1.15 x the strongest on each task.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {
            "children": 1, "bins": 15, "bounds_from_experts": (0.85, 1.15), "elite_sampling": True,
            "elite_slope": 0.8, "crossover_mu": 1.0, "crossover_sigma": 0.01, "mutation": "svd",
            "w_min": 1.0, "w_max": 1.1, "merge_elites": True,
        },
    }

    preset: Literal["default", "paper"] = Field(
        default="default",
        description="paper: the released code's settings for the paper's method; options written beside it win",
    )
    children: int = Field(default=4, ge=1,
                          description="children per generation, all bred from the cycling task's archive")
    bins: int = Field(default=15, ge=1, description="equal bins per descriptor task between its low and high bound")
    bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="objective name -> (low, high) score range binned; default (0, 1)"
    )
    bounds_from_experts: tuple[float, float] | None = Field(
        default=None, description="(a, b): bin each task from a x the weakest expert's score to b x the strongest "
        "(the paper: 0.85, 1.15); replaces `bounds`",
    )
    elite_sampling: bool = Field(default=True,
                                 description="parents drawn with prob. ~ prod(0.5 + slope norm(f)); false: uniform")
    elite_slope: float = Field(default=0.3, gt=0,
                               description="elite sampling's slope (paper text 0.3, released code 0.8)")
    crossover_mu: float = Field(default=1.0, description="mean of the crossover weights w1, w2 ~ N(mu, sigma^2)")
    crossover_sigma: float = Field(default=0.3, ge=0)
    mutation: Literal["svd", "gaussian", "none"] = "svd"
    w_min: float = Field(default=0.0, ge=0, description="SVD mutation: singular values scaled by w ~ U[w_min, w_max]")
    w_max: float = Field(default=2.0, gt=0, description="SVD mutation: singular values scaled by w ~ U[w_min, w_max]")
    noise: float = Field(default=0.1, gt=0,
                         description="gaussian mutation: noise std in units of each task-vector matrix's std")
    merge_elites: bool = Field(
        default=True,
        description="after each full cycle, also evaluate the softmax-weighted merge of the archives' best elites",
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> CycleQDOptions:
        for name, (low, high) in self.bounds.items():
            if not low < high:
                raise ValueError(f"bounds of '{name}': low {low} must be below high {high}")
        if not self.w_min < self.w_max:
            raise ValueError(f"w_min {self.w_min} must be below w_max {self.w_max}")
        return self

    def bounds_of(self, objective: str) -> tuple[float, float]:
        return self.bounds.get(objective, (0.0, 1.0))


class SwarmOptions(_Options):
    """Model Swarms: particle swarm over the experts' weights (``sampler: swarm``).

    The defaults are the paper's (Feng et al., arXiv 2410.11163, section 2 and appendix) except
    ``box``: the paper's positions are unbounded, this package's stay within [-5, 5], five times
    one expert's own weight and wider than any initial crossover. ``preset: paper`` pins every
    number to the paper's, positions unbounded.

    ``particle_kind`` says what a particle's coefficients combine. ``task_vectors`` (default): the
    experts' task vectors, ``base + sum_i c_i (W_i - base)``, for any experts (full fine-tunes, or
    ``base+adapter`` ones, whose task vectors are then ``scaling * B_i @ A_i``). ``lora``: the
    experts are LoRA adapters over one base and a particle is itself an adapter, its ``lora_A`` and
    ``lora_B`` combined separately, ``base + scaling * (sum_i c_i B_i) @ (sum_i c_i A_i)``, as in the
    paper's released code; the winner is also written as an adapter (``best/adapter``).
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {
            "particles": 20, "phi_v": 0.4, "phi_p": 0.3, "phi_g": 0.3, "phi_w": 0.3, "step": 1.0,
            "step_decay": 0.95, "step_min": 0.1, "patience": 10, "max_iterations": 200,
            "restart_fraction": 0.67,  # the paper's scripts; the released code's default is 0.5
            "box": None,
        },
    }

    preset: Literal["default", "paper"] = Field(
        default="default",
        description="paper: every option at the paper's value (positions unbounded); options written beside it win",
    )
    box: tuple[float, float] | None = Field(
        default=(-5.0, 5.0),
        description="coefficient range the particles move in; the recipe's weight ranges are widened to include it "
        "(initial crossovers reach [-1, 2], moves go further); null: unbounded, as in the paper",
    )
    particles: int = Field(default=20, ge=2, description="swarm size N: the experts plus pairwise crossovers")
    particle_kind: Literal["task_vectors", "lora"] = Field(
        default="task_vectors",
        description="task_vectors: particles weight the experts' task vectors; lora: the experts are base+adapter "
        "LoRA adapters of one base, rank, alpha and target modules, and a particle is the adapter whose A and B "
        "factors are the weighted sums of theirs (the paper's code)",
    )
    phi_v: float = Field(default=0.4, ge=0, description="inertia")
    phi_p: float = Field(default=0.3, ge=0, description="pull to the personal best")
    phi_g: float = Field(default=0.3, ge=0, description="pull to the global best")
    phi_w: float = Field(default=0.3, ge=0, description="push from the global worst")
    step: float = Field(default=1.0, gt=0, description="initial step length lambda")
    step_decay: float = Field(default=0.95, gt=0, le=1)
    step_min: float = Field(default=0.1, gt=0)
    patience: int = Field(default=10, ge=1,
                          description="iterations without a new global best before the swarm restarts")
    max_iterations: int = Field(default=200, ge=1, description="iterations before the swarm restarts regardless")
    restart_fraction: float = Field(
        default=0.67, gt=0,
        description="a particle whose best has not improved for this x patience iterations is reset to it",
    )

    @model_validator(mode="after")
    def _check_box(self) -> SwarmOptions:
        if self.box is not None and not (self.box[0] <= 0.0 and self.box[1] >= 1.0):
            raise ValueError(f"box {list(self.box)} must include [0, 1]: the swarm starts at the experts themselves")
        return self


SamplerOptions = OptunaOptions | PyCmaOptions | CycleQDOptions | SwarmOptions
TYPED_OPTIONS: dict[str, type[_Options]] = {"cma": PyCmaOptions, "cycleqd": CycleQDOptions, "swarm": SwarmOptions}


def options_for(sampler: str, options: Any) -> _Options:
    """``options`` validated into the model of ``sampler``; a ValueError names the offending option."""
    model = TYPED_OPTIONS.get(sampler, OptunaOptions)
    if isinstance(options, model):
        return options
    if isinstance(options, BaseModel):
        options = options.model_dump(exclude_unset=True)
    try:
        return model.model_validate(options)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key = ".".join(map(str, err["loc"]))
        if err["type"] == "extra_forbidden":
            raise ValueError(
                f"sampler '{sampler}' has no option '{key}'; it takes: {', '.join(model.model_fields)}"
            ) from None
        raise ValueError(f"sampler '{sampler}' option '{key}': {err['msg']}") from None
