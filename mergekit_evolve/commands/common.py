"""What every subcommand shares: the console, logging set-up, and printing a run's report."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import click
import optuna
import transformers
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

LOG = logging.getLogger("mergekit_evolve")
console = Console(stderr=True)


class OneLine(logging.Filter):
    """Without -v a logged exception is one line, its message and the error, from whichever library
    logs it (SQLAlchemy logs a cursor it cannot close after a Ctrl-C with its whole traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg, record.args = f"{record.getMessage()}: {type(error).__name__}: {error}", None
            record.exc_info = record.exc_text = None
        return True


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    if not verbose:
        handler.addFilter(OneLine())
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    LOG.setLevel(logging.INFO if verbose == 0 else level)
    # a failed trial is one line; its traceback is in the run folder's failures.log, here with -v
    logging.getLogger("mergekit_evolve.tracebacks").setLevel(logging.INFO if verbose else logging.WARNING)
    for noisy in ("optuna", "lm_eval", "lm-eval", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)
    if verbose < 2:
        # Optuna logs every trial through its own handler (a failed one with its whole traceback,
        # Ctrl-C included) and flags the heartbeat API as experimental; the progress bar,
        # trials.jsonl and failures.log already say all of it.
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated")
        transformers.logging.set_verbosity_error()  # mergekit passes transformers' deprecated torch_dtype


def print_report(report: dict[str, Any]) -> None:
    stage = f"stage {report['stage']}: " if "stage" in report else ""
    table = Table(title=f"{stage}winner (trial {report['winner']['trial']}) vs sources",
                  caption=f"objective: {report['objective']}")
    table.add_column("model")
    table.add_column("search", justify="right")
    table.add_column("held-out", justify="right")
    table.add_row("[bold]winner", f"{report['winner']['search']:.4f}", f"[bold]{report['winner']['heldout']:.4f}")
    for name, row in report["sources"].items():
        table.add_row(Path(name).name if Path(name).is_absolute() else name, f"{row['search']:.4f}",
                      f"{row['heldout']:.4f}")
    Console().print(table)
    click.echo(f"run folder: {report['run_dir']}")
