"""``mergekit-evolve space RUN_DIR``: the demo Space's app, run locally on the winner and its sources."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from mergekit_evolve.publish.errors import PublishError
from mergekit_evolve.publish.gradio_app import (
    SETTINGS_FILE,
    local_settings,
    template_path,
)
from mergekit_evolve.publish.run_files import RunFiles


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True, help="Port on 127.0.0.1.")
def space(run_dir: Path, port: int) -> None:
    """Launch the Gradio demo on RUN_DIR's best/ and its local source models, on the CPU.

    It is the same gradio_template/app.py a published Space runs, started the way a Space starts it.
    """
    try:
        run = RunFiles(run_dir)
        run.check()
        app = template_path("app.py")
        settings = local_settings(run)
    except PublishError as e:
        raise click.ClickException(str(e)) from None
    with tempfile.TemporaryDirectory(prefix="mergekit-evolve-space-") as tmp:
        config = Path(tmp) / SETTINGS_FILE
        config.write_text(json.dumps(settings, indent=2), encoding="utf-8")
        env = {
            **os.environ,
            "MERGEKIT_EVOLVE_SPACE_CONFIG": str(config),
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_SERVER_PORT": str(port),
            "GRADIO_ANALYTICS_ENABLED": "False",
        }
        env.pop("MODEL_ID", None)  # that variable is the published Space's; here the model is best/
        click.echo(f"serving {run.best} on http://127.0.0.1:{port} (Ctrl-C to stop)", err=True)
        proc = subprocess.Popen([sys.executable, str(app)], env=env)
        # the app is this command's child: whoever stops the command stops the app too
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            code = 130
    sys.exit(code)
