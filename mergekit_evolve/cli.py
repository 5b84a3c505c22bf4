"""The ``mergekit-evolve`` command: a click group whose subcommands live in ``commands/``.

Subcommands are imported when they are used (click's documented lazy-loading pattern), so
``mergekit-evolve RECIPE`` imports only ``run``'s, and ``--version`` none.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import version as dist_version

import click

# name -> "module:attribute", in the order --help lists them
COMMANDS = {
    "run": "mergekit_evolve.commands.run:run",
    "merge": "mergekit_evolve.commands.merge:merge",
    "export": "mergekit_evolve.commands.export:export",
    "publish": "mergekit_evolve.commands.publish:publish",
    "space": "mergekit_evolve.commands.app:space",
    "migrate": "mergekit_evolve.commands.migrate:migrate",
    "prepare": "mergekit_evolve.commands.prepare:prepare",
}


class _LazyGroup(click.Group):
    """Subcommands imported on use; ``mergekit-evolve RECIPE`` means ``mergekit-evolve run RECIPE``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in COMMANDS and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _version_text() -> str:
    return (
        f"mergekit-evolve {dist_version('mergekit-evolve')} (evolutionary merge search; "
        f"this is not mergekit's deprecated mergekit-evolve), mergekit {dist_version('mergekit')}, "
        f"optuna {dist_version('optuna')}, lm-eval {dist_version('lm_eval')}"
    )


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(message="%(version)s", version=_version_text())
def cli() -> None:
    """Evolutionary model merging for mergekit.

    \b
    mergekit-evolve RECIPE.yml            search, then write the winner (same as `run`)
    mergekit-evolve RECIPE.yml --dry-run  validate, print the space and one config

    A recipe is a mergekit config whose values may be search annotations
    ({search: [0, 1]}, {choice: [ties, dare_ties]}, ...) plus an `evolve:` section
    naming the sampler, the trial budget and the lm-eval objectives.
    """


def main() -> None:
    # lm-eval and mergekit draw a tqdm bar per call; the search shows one rich bar instead.
    # tqdm reads this when first imported, so it is set before any of them loads.
    if "-v" not in sys.argv and "-vv" not in sys.argv:
        os.environ.setdefault("TQDM_DISABLE", "1")
    cli(prog_name="mergekit-evolve")
