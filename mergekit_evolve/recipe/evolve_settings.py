"""The ``evolve:`` section of a recipe: how to search and what to score."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SAMPLERS = ("cmaes", "tpe", "random")


class Objective(BaseModel):
    """One lm-eval task metric; the search maximises the weighted mean of all objectives."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="lm-eval task (or group) scored during the search")
    metric: str = Field(default="acc,none", description="key in lm-eval's results, e.g. 'acc,none'")
    weight: float = Field(default=1.0, gt=0)
    goal: Literal["maximize", "minimize"] = "maximize"
    limit: int | float | None = Field(default=None, description="examples per candidate (lm-eval --limit)")
    num_fewshot: int | None = None
    heldout_task: str | None = Field(
        default=None, description="task scored only for the report (winner vs sources), never during the search"
    )
    heldout_limit: int | float | None = None

    @property
    def name(self) -> str:
        return f"{self.task}/{self.metric}"


class EvolveSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sampler: Literal["cmaes", "tpe", "random"] = "cmaes"
    sampler_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments for the sampler's constructor"
    )
    trials: int = Field(default=50, ge=1, description="completed trials to reach (resumes count)")
    seed: int = 0
    objectives: list[Objective] = Field(min_length=1)
    task_paths: list[str] = Field(default_factory=list, description="folders of lm-eval task YAMLs, relative to the recipe")
    storage: str | None = Field(default=None, description="Optuna storage URL; default SQLite in the run folder")
    study_name: str | None = None
    batch_size: int | str = 32
    device: str = Field(default="auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    max_failures: int = Field(default=20, ge=1, description="stop after this many failed candidates in a row")
    apply_chat_template: bool = False

    @model_validator(mode="after")
    def _unique_objectives(self) -> "EvolveSettings":
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives repeat a task/metric pair: {names}")
        return self
