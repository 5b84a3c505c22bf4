"""The package as a user installs it: build the sdist and the wheel, install the wheel (not editable) into a
fresh virtual environment, run the demo there and publish its winner with a Space to a local test Hub."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
from hub_server import FakeHub

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = "mergekit_evolve/publish/gradio_template/app.py"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would import the source checkout instead of the wheel."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("GITHUB_")}
    return {**env, **extra}


def sh(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env or clean_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_and_publishes_model_and_space(tmp_path):
    # build from a copy of what the sdist needs, so the checkout gets no build/ or egg-info
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "mergekit_evolve", source / "mergekit_evolve", ignore=shutil.ignore_patterns("__pycache__"))
    # --no-isolation: the build backend is this environment's setuptools, so building needs no download
    sh(sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp_path / "dist", source, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    assert TEMPLATE in zipfile.ZipFile(wheel).namelist()

    # torch, transformers, ... come from this environment's site-packages: nothing is downloaded
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=tmp_path)
    sh(venv / "bin" / "python", "-m", "pip", "install", "--no-index", "--no-deps", "-q", wheel, cwd=tmp_path)
    where = sh(venv / "bin" / "python", "-c", "import mergekit_evolve; print(mergekit_evolve.__file__)", cwd=tmp_path)
    assert where.strip().startswith(str(venv)), where  # the wheel's copy, not the checkout

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(REPO / "recipes" / "demo", work / "demo", ignore=shutil.ignore_patterns("__pycache__"))
    recipe = work / "demo.yml"
    recipe.write_text((REPO / "recipes" / "demo.yml").read_text() + (
        "publish:\n  repo: alice/demo-merge\n  space: alice/demo-merge-demo\n  license: mit\n"
    ))
    token = "hf_" + secrets.token_hex(16)
    hub = FakeHub({token: "alice"}).start()
    try:
        env = clean_env(HF_TOKEN=token, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="1",
                        HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"))
        out = sh(venv / "bin" / "mergekit-evolve", recipe, "--trials", "4", "--no-progress", cwd=work, env=env)
        assert token not in out
        model, space = hub.repo("alice/demo-merge"), hub.repo("alice/demo-merge-demo", "space")
        assert model.files["model.safetensors"] == (work / "runs" / "demo" / "best" / "model.safetensors").read_bytes()
        installed_template = venv.glob(f"lib/python*/site-packages/{TEMPLATE}")
        assert space.files["app.py"] == next(installed_template).read_bytes()
        # no folder of this machine: the run's, the checkout's, the home and temp folders
        machine = {tmp_path, REPO.parent, Path.home(), Path(tempfile.gettempdir())}
        machine_paths = "|".join(re.escape(str(p)) for p in machine)
        for repo in (model, space):
            for name, content in repo.files.items():
                if name.endswith((".md", ".yml", ".json", ".py", ".txt")):
                    assert not re.search(machine_paths, content.decode()), name
    finally:
        hub.stop()
