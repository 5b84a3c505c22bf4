"""The optional ``publish:`` section of a recipe: where the winner goes on the Hugging Face Hub."""

from __future__ import annotations

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def check_repo_id(value: str) -> str:
    """``owner/name`` as the Hub accepts it; a bare name would land in whichever account the token belongs to."""
    if value.count("/") != 1:
        raise ValueError(f"'{value}' is not of the form owner/name")
    try:
        validate_repo_id(value)
    except HFValidationError as e:
        raise ValueError(str(e)) from None
    return value


class PublishSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repo: str | None = Field(
        default=None, description="model repo owner/name; when set, the run pushes its winner there at the end")
    space: str | None = Field(
        default=None, description="Gradio demo Space owner/name, created or updated beside the model")
    private: bool = Field(default=False, description="create the repos private (an existing repo keeps its visibility)")
    license: str | None = Field(
        default=None,
        description="license id for the model card, e.g. apache-2.0 (default: the license every source's card states)",
    )
    hub_ids: dict[str, str] = Field(
        default_factory=dict,
        description="local source folders (relative to the recipe) -> the Hub id they were downloaded from; "
                    "published files name them by it",
    )

    @field_validator("repo", "space")
    @classmethod
    def _repo_id(cls, value: str | None) -> str | None:
        return None if value is None else check_repo_id(value)

    @field_validator("hub_ids")
    @classmethod
    def _hub_ids(cls, value: dict[str, str]) -> dict[str, str]:
        for folder, repo in value.items():
            try:
                check_repo_id(repo)
            except ValueError as e:
                raise ValueError(f"hub_ids['{folder}']: {e}") from None
        return value

    @model_validator(mode="after")
    def _space_needs_repo(self) -> PublishSettings:
        if self.space and not self.repo:
            raise ValueError("'space' needs 'repo': the Space serves the model pushed there")
        return self
