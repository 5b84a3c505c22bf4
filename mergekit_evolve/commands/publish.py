"""``mergekit-evolve publish RUN_DIR``: the winner to a Hub model repo, optionally with a demo Space."""

from __future__ import annotations

from pathlib import Path

import click

from mergekit_evolve.commands.common import setup_logging
from mergekit_evolve.publish.errors import PublishError
from mergekit_evolve.publish.hub import (
    describe,
    plan_publish,
    push,
    resolve_token,
    write_plan,
)
from mergekit_evolve.publish.run_files import RunFiles
from mergekit_evolve.recipe.publish_settings import check_repo_id


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--repo", default=None, help="Model repo USER/NAME (default: the recipe's publish.repo).")
@click.option("--space", default=None,
              help="Also create or update this Gradio Space USER/NAME-demo (default: publish.space).")
@click.option("--private", is_flag=True, default=None, help="Create the repos private (default: publish.private).")
@click.option("--license", "license_id", default=None,
              help="License id for the model card (default: publish.license, else the one every source's card states).")
@click.option("--dry-run", "dry_run", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write exactly what would be uploaded into this folder (model/ and space/), print the plan, "
                   "send nothing.")
@click.option("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT, else https://huggingface.co).")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def publish(run_dir: Path, repo: str | None, space: str | None, private: bool | None, license_id: str | None,
            dry_run: Path | None,
            endpoint: str | None, verbose: int) -> None:
    """Push RUN_DIR's winner (best/ with its model card) to the Hugging Face Hub in one commit.

    \b
    The token comes from HF_TOKEN or `hf auth login`; it is never printed or written.
    Re-running updates the repos: changed files are replaced, files the winner no longer has are removed.
    """
    setup_logging(verbose)
    try:
        settings = RunFiles(run_dir).publish
        repo = repo or settings.repo
        space = space or settings.space
        if not repo:
            raise PublishError("no model repo: pass --repo USER/NAME or set publish.repo in the recipe")
        for option, value in (("--repo", repo), ("--space", space)):
            if value:
                try:
                    check_repo_id(value)
                except ValueError as e:
                    raise PublishError(f"{option}: {e}") from None
        token = None if dry_run else resolve_token()  # before any work: a missing token is the commonest failure
        plan = plan_publish(run_dir, repo, space, settings.private if private is None else private, license_id)
        click.echo(describe(plan))
        if dry_run:
            write_plan(plan, dry_run)
            click.echo(f"dry run: nothing was sent; the files are in {dry_run}")
            return
        for url in push(plan, endpoint, token):
            click.echo(f"published: {url}")
    except PublishError as e:
        raise click.ClickException(str(e)) from None
