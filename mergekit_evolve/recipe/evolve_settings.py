"""The ``evolve:`` section of a recipe: how to search and what to score."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mergekit_evolve.recipe.sampler_options import (
    OptunaOptions,
    SamplerOptions,
    options_for,
)

Sampler = Literal["cmaes", "cma", "tpe", "gp", "random", "nsga2", "cycleqd", "swarm"]
# Samplers that `pruner: auto` prunes: they take trials one by one and learn from pruned ones
# (TPE from their intermediate values). Population methods, CMA-ES included, are left unpruned:
# Optuna's CmaEsSampler drops pruned trials from its generation (it fills only with completed
# members), so pruning would spend their cost without teaching it anything.
PRUNABLE_SAMPLERS = ("tpe", "gp", "random")
SAMPLERS: tuple[str, ...] = get_args(Sampler)
# Settings that may change between a run and its resume without changing what is searched.
RESUMABLE = {"trials", "device", "batch_size", "max_failures", "workers", "heartbeat_grace", "threads", "allow_crimes",
             "allow_constant_objectives"}


class _ObjectiveBase(BaseModel):
    """What every kind of objective has: how it weighs, which way is better, how many examples."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(default=1.0, gt=0)
    goal: Literal["maximize", "minimize"] = "maximize"
    limit: int | float | None = Field(default=None,
                                      description="examples per candidate (a count, or a fraction below 1)")
    heldout_limit: int | float | None = None
    anchors: int | None = Field(
        default=None, ge=2,
        description="anchor examples chosen from the sources' results (tinyBenchmarks style); with a pruner their "
        "estimate is the first rung (pruned there, or scored on the whole split), without one the trial's value",
    )

    @property
    def sign(self) -> int:
        """The one place the goal becomes a sign: a score times ``sign`` is higher-is-better."""
        return 1 if self.goal == "maximize" else -1


class TaskObjective(_ObjectiveBase):
    """One lm-eval task metric; the search maximises the weighted mean of all objectives."""

    task: str = Field(description="lm-eval task (or group) scored during the search")
    metric: str = Field(default="acc,none", description="key in lm-eval's results, e.g. 'acc,none'")
    num_fewshot: int | None = None
    heldout_task: str | None = Field(
        default=None, description="task scored only for the report (winner vs sources), never during the search"
    )

    @property
    def name(self) -> str:
        return f"{self.task}/{self.metric}"

    @property
    def field(self) -> str:
        """The recipe key that says what this objective scores (errors point there)."""
        return "task"

    @property
    def scored_on(self) -> str:
        """What the search scores, as the card and report name it."""
        return self.task

    @property
    def heldout_scored_on(self) -> str:
        return self.heldout_task or self.task

    @property
    def separate_heldout(self) -> bool:
        return self.heldout_task is not None


class ExampleObjective(_ObjectiveBase):
    """An objective scored outside lm-eval, one float per example of a JSONL file; its aggregate is their mean.

    Each kind (``python``, ``reward_model``; a judge model next) names its data files in ``data_fields``,
    and evaluate/ has one scorer per kind behind the same per-example interface."""

    name: str = Field(default="", description="the objective's name in scores, reports and `select` (default: derived)")

    data_fields: ClassVar[tuple[str, str]]  # (search data field, held-out data field)

    @property
    def metric(self) -> str:
        """The key of its per-example rows (as lm-eval's ``metric,filter``): the objective's own name."""
        return f"{self.name},none"

    @property
    def scored_on(self) -> str:
        return str(getattr(self, self.data_fields[0]))

    @property
    def heldout_scored_on(self) -> str:
        return str(getattr(self, self.data_fields[1]) or self.scored_on)

    @property
    def separate_heldout(self) -> bool:
        return getattr(self, self.data_fields[1]) is not None


class PythonObjective(ExampleObjective):
    """A Python function scores the resident model on each example of a JSONL file."""

    python: str = Field(description="'file.py:function' (relative to the recipe's folder) "
                                    "or 'package.module:function'; "
                                    "called as function(model, tokenizer, examples) -> one float per example")
    data: str = Field(description="JSONL file of examples (one JSON object a line), relative to the recipe's folder")
    heldout_data: str | None = Field(default=None, description="JSONL examples scored only for the report")

    data_fields: ClassVar[tuple[str, str]] = ("data", "heldout_data")

    @field_validator("python")
    @classmethod
    def _function_path(cls, value: str) -> str:
        module, _, function = value.rpartition(":")
        if not module or not function.isidentifier():
            raise ValueError(f"'{value}' is not 'file.py:function' or 'package.module:function'")
        return value

    @model_validator(mode="after")
    def _default_name(self) -> PythonObjective:
        if not self.name:
            self.name = self.python.rpartition(":")[2]
        return self

    @property
    def field(self) -> str:
        return "python"


class GenerationSettings(BaseModel):
    """How the resident model answers each prompt before it is scored."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(default=64, ge=1)
    do_sample: bool = Field(default=False, description="greedy decoding unless true")
    temperature: float = Field(default=1.0, gt=0, description="with do_sample")
    seed: int = Field(default=0, description="with do_sample: each prompt's sample is seeded by this and its position")


class RewardObjective(ExampleObjective):
    """A local reward model (``AutoModelForSequenceClassification``) scores the resident model's answer to
    each prompt."""

    reward_model: str = Field(description="folder of a sequence-classification model, relative to the recipe's folder")
    prompts: str = Field(description="JSONL file, one object with a 'prompt' string a line, "
                                     "relative to the recipe's folder")
    heldout_prompts: str | None = Field(default=None, description="JSONL prompts scored only for the report")
    label: int | str | None = Field(
        default=None,
        description="which output is the reward: an index or a label name (default: the model's single output)",
    )
    generation: GenerationSettings = Field(default_factory=GenerationSettings)

    data_fields: ClassVar[tuple[str, str]] = ("prompts", "heldout_prompts")

    @model_validator(mode="after")
    def _default_name(self) -> RewardObjective:
        if not self.name:
            self.name = "reward:" + self.reward_model.rstrip("/").rpartition("/")[2]
        return self

    @property
    def field(self) -> str:
        return "reward_model"


DEFAULT_RUBRIC = (
    "Rate the answer to the question from 1 (useless) to 5 (excellent).\n\nQuestion: {prompt}\n\n"
    "Answer: {answer}\n\nRating (1-5):"
)
DEFAULT_PAIRWISE_RUBRIC = (
    "Which answer to the question is better? Reply with A or B.\n\nQuestion: {prompt}\n\n"
    "Answer A: {answer_a}\n\nAnswer B: {answer_b}\n\nBetter answer (A or B):"
)
ENDPOINT_PREFIX = "openai:"  # judge_model: openai:MODEL is a judge behind an OpenAI-compatible endpoint


class EndpointSettings(BaseModel):
    """How to reach a judge behind an OpenAI-compatible chat-completions endpoint (``judge_model: openai:MODEL``).

    The URL and the key are read from the environment, never written in the recipe: a recipe is
    shared and published with the model."""

    model_config = ConfigDict(extra="forbid")

    url_env: str = Field(default="OPENAI_BASE_URL", description="the environment variable holding the endpoint's "
                         "base URL, e.g. http://localhost:8000/v1 (unset: https://api.openai.com/v1)")
    key_env: str = Field(default="OPENAI_API_KEY", description="the environment variable holding its API key "
                         "(unset: no key is sent, as a local server needs none)")
    concurrency: int = Field(default=4, ge=1, description="requests in flight at once")
    timeout: float = Field(default=120.0, gt=0, description="seconds to wait for one reply")
    retries: int = Field(default=3, ge=0, description="tries again after a rate limit, a server error or a lost "
                         "connection, waiting 1, 2, 4 ... s (or the server's Retry-After)")


# settings that only a judge whose reply is parsed reads
PARSE_ONLY = {"pattern", "judge_generation", "unparsed_score"}
# what each judge mode's rubric must hold: where the judged answer(s) go
RUBRIC_SLOTS = {"single": ("{answer}",), "pairwise": ("{answer_a}", "{answer_b}")}


def missing_slots(rubric: str, mode: str) -> str | None:
    """A rubric's complaint when it lacks a slot its judge mode fills in, else None."""
    missing = [s for s in RUBRIC_SLOTS[mode] if s not in rubric]
    if not missing:
        return None
    return f"the {mode} rubric must hold {' and '.join(RUBRIC_SLOTS[mode])} (and usually {{prompt}}): " \
           f"where the judged answer{'s go' if mode == 'pairwise' else ' goes'}; it lacks {', '.join(missing)}"


class JudgeObjective(ExampleObjective):
    """A local causal LM judges the resident model's answer to each prompt by a rubric: the score is
    the judge's expected rating, its next-token probabilities over the rating tokens (G-Eval style),
    or with ``scoring: parse`` the rating read from the reply it writes (MT-Bench, Model Swarms).

    In ``pairwise`` mode the judge compares the answer with a source model's (MT-Bench style) in
    both orders; the score is its preference for the candidate, from 0 to 1."""

    judge_model: str = Field(description="folder of a causal LM, relative to the recipe's folder; or openai:MODEL, "
                             "a model behind an OpenAI-compatible endpoint (see endpoint)")
    endpoint: EndpointSettings | None = Field(
        default=None, description="openai:MODEL: where the endpoint's URL and key are found, and how it is asked")
    prompts: str = Field(description="JSONL file, one object with a 'prompt' string a line, "
                                     "relative to the recipe's folder")
    heldout_prompts: str | None = Field(default=None, description="JSONL prompts scored only for the report")
    mode: Literal["single", "pairwise"] = Field(
        default="single", description="single: rate each answer alone; pairwise: compare it with the reference's")
    reference: str | None = Field(
        default=None, description="pairwise: the source model (as the recipe names it) whose answers the candidate's "
        "are compared with (default: the base model, else the first model)")
    rubric: str | None = Field(
        default=None, description="what the judge reads; {prompt} and {answer} (pairwise: {answer_a}, {answer_b}) "
        "are filled in (default: the mode's built-in rubric)")
    rubric_file: str | None = Field(default=None,
                                    description="a text file holding the rubric, relative to the recipe's folder")
    ratings: list[str] = Field(
        default=["1", "2", "3", "4", "5"], min_length=2,
        description="single: the judge's possible next tokens, each a number (one token of its tokenizer); "
        "parse: a rating read outside their range is unparsed",
    )
    verdicts: list[str] = Field(
        default=["A", "B"], min_length=2, max_length=2,
        description="pairwise: the judge's next token preferring answer A, then B (each one token of its tokenizer)",
    )
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    scoring: Literal["expected", "parse"] | None = Field(
        default=None,  # resolved by _consistent: parse for an endpoint, else expected
        description="expected (default for a local judge): the judge's expected rating (verdict) over its next-token "
        "probabilities; parse (an endpoint's only scoring): the judge writes a reply and the rating (verdict) is read "
        "from it by 'pattern'")
    pattern: str | None = Field(
        default=None, description="parse: a regular expression whose first group is the rating (pairwise: the "
        "verdict); its first match counts (default: the first number, pairwise: the first verdict standing alone)")
    judge_generation: GenerationSettings = Field(
        default_factory=lambda: GenerationSettings(max_new_tokens=16),
        description="parse: how the judge writes its reply (greedy unless do_sample)")
    unparsed_score: float | None = Field(
        default=None, description="parse: the score of a judgement no rating (verdict) can be read from "
        "(default: the lowest rating; pairwise 0.5, no preference)")

    data_fields: ClassVar[tuple[str, str]] = ("prompts", "heldout_prompts")

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            groups = re.compile(value).groups
        except re.error as e:
            raise ValueError(f"pattern {value!r} is no regular expression: {e}") from None
        if groups < 1:
            raise ValueError(f"pattern {value!r} has no group: its first group (...) is what it reads")
        return value

    @field_validator("ratings")
    @classmethod
    def _numbers(cls, value: list[str]) -> list[str]:
        for rating in value:
            try:
                float(rating)
            except ValueError:
                raise ValueError(f"rating '{rating}' is not a number") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> JudgeObjective:
        other = "single" if self.mode == "pairwise" else "pairwise"
        stray = sorted(self.model_fields_set & ({"ratings"} if other == "single" else {"reference", "verdicts"}))
        if stray:
            raise ValueError(f"{', '.join(stray)} belong(s) to mode: {other} (this objective's mode is {self.mode})")
        if self.rubric is not None and self.rubric_file is not None:
            raise ValueError("give the rubric or a rubric_file, not both")
        if self.rubric is not None and (complaint := missing_slots(self.rubric, self.mode)):
            raise ValueError(complaint)
        if self.endpoint is not None and not self.remote:
            raise ValueError(f"endpoint belongs to a judge behind an endpoint (judge_model: {ENDPOINT_PREFIX}MODEL); "
                             f"'{self.judge_model}' is a folder")
        if self.scoring is None:
            self.scoring = "parse" if self.remote else "expected"
        elif self.remote and self.scoring == "expected":
            raise ValueError("scoring: expected needs the judge's next-token probabilities, which a local judge gives; "
                             "a judge behind an endpoint is scored by its reply (scoring: parse)")
        if self.remote and self.endpoint is None:
            self.endpoint = EndpointSettings()
        if self.scoring == "expected" and (stray := sorted(self.model_fields_set & PARSE_ONLY)):
            raise ValueError(f"{', '.join(stray)} belong(s) to scoring: parse (this objective's scoring is expected)")
        if len(set(self.verdicts)) != 2:
            raise ValueError(f"verdicts {self.verdicts} must be two different tokens")
        if not self.name:
            self.name = "judge:" + self.judge_model.rstrip("/").rpartition("/")[2]
        return self

    @property
    def field(self) -> str:
        return "judge_model"

    @property
    def remote(self) -> bool:
        """A judge behind an OpenAI-compatible endpoint, not a local folder."""
        return self.judge_model.startswith(ENDPOINT_PREFIX)


# each objective names exactly one of these keys; the key says which model reads it
OBJECTIVE_KINDS = {"task": TaskObjective, "python": PythonObjective, "reward_model": RewardObjective,
                   "judge_model": JudgeObjective}


def _objective_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return f"objective[{next(k for k, v in OBJECTIVE_KINDS.items() if isinstance(value, v))}]"
    found = [k for k in OBJECTIVE_KINDS if isinstance(value, dict) and k in value]
    # tags hold "[" so recipe errors leave them out of the place they name (parse.validation_message)
    return f"objective[{found[0]}]" if len(found) == 1 else None


Objective = Annotated[
    Annotated[TaskObjective, Tag("objective[task]")]
    | Annotated[PythonObjective, Tag("objective[python]")]
    | Annotated[RewardObjective, Tag("objective[reward_model]")]
    | Annotated[JudgeObjective, Tag("objective[judge_model]")],
    Discriminator(
        _objective_kind, custom_error_type="objective_kind",
        custom_error_message="an objective names exactly one of 'task' (lm-eval), 'python' (a function), "
        "'reward_model' (a local reward model folder) or 'judge_model' (a local causal LM folder)",
    ),
]


class SelectRule(BaseModel):
    """Which trial of a multi-objective run's Pareto front becomes ``best/``.

    Ranked by the weighted objective (default) or by one named objective, among the Pareto
    trials that meet every ``at_least`` / ``at_most`` bound (all of them when none does).
    """

    model_config = ConfigDict(extra="forbid")

    weighted: bool = False
    objective: str | None = Field(default=None, description="rank by this objective (its name, task, or task/metric)")
    at_least: dict[str, float] = Field(default_factory=dict, description="objective -> lowest acceptable score")
    at_most: dict[str, float] = Field(default_factory=dict, description="objective -> highest acceptable score")

    @model_validator(mode="after")
    def _one_ranking(self) -> SelectRule:
        if self.weighted and self.objective:
            raise ValueError("select ranks by the weighted objective or by one objective, not both")
        return self


class PruningSettings(BaseModel):
    """Score candidates on growing slices of the search split; an Optuna pruner may stop them early."""

    model_config = ConfigDict(extra="forbid")

    # auto: where pruning can apply (one objective, a sampler in PRUNABLE_SAMPLERS), successive halving over the
    # stages, or with anchors the percentile pruner described in EvolveSettings; none elsewhere.
    # bench/cheap_fitness.py measures the choices.
    pruner: Literal["auto", "none", "median", "percentile", "successive_halving", "hyperband", "wilcoxon"] = "auto"
    stages: list[float] = Field(
        default=[0.25, 0.5, 1.0],
        description="fractions of the search split, ending at 1; "
        "objectives with anchors climb their anchor estimate first",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the Optuna pruner")

    @model_validator(mode="after")
    def _stages(self) -> PruningSettings:
        if (not self.stages or self.stages[-1] != 1.0
                or any(not a < b for a, b in zip([0.0, *self.stages], self.stages, strict=False))):
            raise ValueError(f"stages must rise from above 0 to exactly 1.0, got {self.stages}")
        return self


class EvolveSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sampler: Sampler = "cmaes"
    sampler_options: SamplerOptions = Field(
        default_factory=OptunaOptions, validate_default=True,  # the default too becomes the sampler's model
        description="keyword arguments for Optuna's sampler; "
        "for cma, cycleqd and swarm see mergekit_evolve.recipe.sampler_options",
    )
    multi_objective: bool = Field(
        default=False, description="one study direction per objective (a Pareto front) instead of their weighted mean"
    )
    select: SelectRule = Field(default_factory=SelectRule, description="multi-objective: which Pareto trial is best/")
    trials: int = Field(
        default=50, ge=1, description="completed trials to reach (resumes count; pruned and failed trials do not)"
    )
    seed: int = 0
    objectives: list[Objective] = Field(min_length=1)
    task_paths: list[str] = Field(default_factory=list,
                                  description="folders of lm-eval task YAMLs, relative to the recipe")
    storage: str | None = Field(
        default=None,
        description="Optuna storage URL (sqlite:///, postgresql://, journal:PATH); default SQLite in the run folder",
    )
    threads: int | None = Field(
        default=None, ge=1,
        description="torch CPU threads per worker (default: the cores divided among the workers); 1 suits tiny models",
    )
    workers: int = Field(default=1, ge=1,
                         description="worker processes (or Ray actors), each with its own resident model")
    heartbeat_grace: int = Field(
        default=120, ge=2,
        description="seconds without a heartbeat after which a running trial is failed and its point retried once",
    )
    study_name: str | None = None
    batch_size: int | str = 32
    device: str = Field(default="auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...")
    pruning: PruningSettings = Field(default_factory=PruningSettings)
    max_failures: int = Field(default=20, ge=1, description="stop after this many failed candidates in a row")
    finalists: int = Field(
        default=5, ge=1,
        description="when trial values are anchor estimates (anchors, pruner none), the best N trials are scored "
        "on the whole search split and the best of those wins (an estimate's noise would otherwise pick a lucky "
        "candidate)",
    )
    apply_chat_template: bool = False
    allow_constant_objectives: bool = Field(
        default=False, description="search even when every source scores the same 0 or 1 on an objective "
        "(normally a broken task; tiny random test models do)",
    )
    allow_crimes: bool = Field(
        default=False, description="let mergekit try to merge models of different architectures (its --allow-crimes)"
    )

    @field_validator("sampler_options", mode="before")
    @classmethod
    def _typed_options(cls, options: Any, info: ValidationInfo) -> Any:
        # the union is discriminated by the sibling field `sampler` (validated first: declared first)
        return options_for(info.data.get("sampler", "cmaes"), options)

    @model_validator(mode="after")
    def _resolve_auto_pruner(self) -> EvolveSettings:
        if self.pruning.pruner != "auto":
            return self
        update: dict[str, Any] = {"pruner": "none"}
        if not self.multi_objective and self.sampler in PRUNABLE_SAMPLERS:
            update = {"pruner": "successive_halving"}
            if any(o.anchors for o in self.objectives):
                # the anchor estimate as the first rung, keeping its top quarter for the whole split:
                # bench/cheap_fitness.py's anchors_auto, ~2x full evaluation's trials at its held-out score
                update = {"pruner": "percentile",
                          "options": {"percentile": 25.0, "n_startup_trials": 4, **self.pruning.options}}
                if "stages" not in self.pruning.model_fields_set:
                    update["stages"] = [1.0]
        self.pruning = self.pruning.model_copy(update=update)
        return self

    @model_validator(mode="after")
    def _unique_objectives(self) -> EvolveSettings:
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives repeat a name (task/metric pair, or name): {names}")
        if self.multi_objective and self.pruning.pruner != "none":
            raise ValueError("multi_objective studies cannot be pruned (Optuna has no intermediate values there); "
                             "set pruning.pruner: none")
        if self.multi_objective and len(names) < 2:
            raise ValueError(f"multi_objective needs at least two objectives; there is one ({names[0]})")
        for name in [self.select.objective, *self.select.at_least, *self.select.at_most]:
            if name is not None:
                self.objective_named(name)
        return self

    @property
    def estimated(self) -> bool:
        """Trial values are anchor estimates: with a pruner, anchors only decide who climbs on to the whole split."""
        return self.pruning.pruner == "none" and any(o.anchors for o in self.objectives)

    def objective_named(self, name: str) -> Objective:
        """The objective called ``name`` (its name, or a task that has one objective)."""
        found = [o for o in self.objectives if name in (o.name, getattr(o, "task", None))]
        if len(found) != 1:
            known = ", ".join(o.name for o in self.objectives)
            raise ValueError(f"'{name}' names {'no' if not found else 'more than one'} objective; "
                             f"the objectives are: {known}")
        return found[0]
