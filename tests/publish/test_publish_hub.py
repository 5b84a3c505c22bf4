"""``mergekit-evolve publish`` against a fake Hub on 127.0.0.1 (tests/hub_server.py): what arrives, and every
failure."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hub_server import FakeHub
from huggingface_hub import constants
from mergekit.config import MergeConfiguration
from test_card import RECIPE, build_run

from mergekit_evolve.cli import cli

TOKEN = "hf_" + secrets.token_hex(16)  # random, so finding it anywhere can only mean it leaked
FLOW_LOGGERS = ("mergekit_evolve", "huggingface_hub", "httpx2", "httpcore2", "httpx", "httpcore")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest makes tests offline; this one talks to 127.0.0.1
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the fake speaks LFS, not xet
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))  # no login of this machine
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    server = FakeHub({TOKEN: "alice"}, orgs={"alice": ["alice-lab"]}).start()
    # as HF_ENDPOINT would: huggingface_hub 2.4 builds one RepoUrl (create_repo after a 403, when the repo
    # exists) against the global endpoint rather than HfApi's, and rejects a URL on any other host
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def finished_run(tiny_llama, tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("publish") / "run", tiny_llama)


@pytest.fixture
def logs():
    """Every log record of the publish flow at DEBUG, whatever the CLI's own logging setup does to the root logger."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    saved = {name: logging.getLogger(name).level for name in FLOW_LOGGERS}
    for name in FLOW_LOGGERS:
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield records
    for name, level in saved.items():
        logging.getLogger(name).removeHandler(handler)
        logging.getLogger(name).setLevel(level)


def publish(run_dir: Path, hub: FakeHub, *extra: str):
    args = ["publish", str(run_dir), "--repo", "alice/tiny-merge", "--space", "alice/tiny-merge-demo",
            "--endpoint", hub.url, "-vv", *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_no_token(hub: FakeHub, result, records: list[logging.LogRecord], *folders: Path) -> None:
    for repo in hub.repos.values():
        for name, content in repo.files.items():
            assert TOKEN.encode() not in content, f"{repo.repo_id}/{name}"
        assert TOKEN not in str(repo.variables) and TOKEN not in str([c.__dict__ for c in repo.commits])
    assert TOKEN not in result.output
    assert not [r for r in records if TOKEN in r.getMessage()]
    for folder in folders:
        for p in folder.rglob("*"):
            assert not p.is_file() or TOKEN.encode() not in p.read_bytes(), p


def test_publish_uploads_model_and_space_in_one_commit_each(hub, finished_run, tiny_llama, logs):
    before = snapshot(finished_run)
    result = publish(finished_run, hub)
    assert result.exit_code == 0, result.output

    model = hub.repo("alice/tiny-merge")
    assert [c.summary for c in model.commits] == [
        "initial commit", "mergekit-evolve: winner of tiny (trial 1, held-out 0.4375)"]
    best = finished_run / "best"
    uploaded = {name: content for name, content in model.files.items() if name != ".gitattributes"}
    assert set(uploaded) == {p.name for p in best.iterdir()}
    rewritten = {"README.md", "mergekit_config.yml"}  # the card names the repo; the config names sources, not paths
    for name, content in uploaded.items():
        if name not in rewritten:
            assert content == (best / name).read_bytes(), name
    config = MergeConfiguration.model_validate(yaml.safe_load(uploaded["mergekit_config.yml"]))
    assert sorted(map(str, config.referenced_models())) == ["base", "v1", "v2"]
    assert {"model.safetensors", "history.png"} <= model.lfs_paths  # binaries went through the LFS batch API
    card = uploaded["README.md"].decode()
    assert 'pipeline("text-generation", model="alice/tiny-merge")' in card
    assert yaml.safe_load(card.split("---")[1])["model-index"][0]["name"] == "tiny-merge"

    space = hub.repo("alice/tiny-merge-demo", "space")
    assert space.sdk == "gradio" and len(space.commits) == 2
    assert {"app.py", "requirements.txt", "README.md", "space_config.json", "history.png", "report.json",
            "mergekit_config.yml", "recipe.yml"} <= set(space.files)
    assert space.files["app.py"] == Path(__file__).parents[2].joinpath("mergekit_evolve", "publish", "gradio_template",
                                                                       "app.py").read_bytes()
    front = yaml.safe_load(space.files["README.md"].decode().split("---")[1])
    assert (front["sdk"], front["app_file"], front["models"][0]) == ("gradio", "app.py", "alice/tiny-merge")
    assert space.variables["MODEL_ID"]["value"] == "alice/tiny-merge"
    assert "published: " + hub.url + "/spaces/alice/tiny-merge-demo" in result.output

    machine_paths = (str(finished_run.parent), str(tiny_llama[0].parent))
    for repo in (model, space):
        for name, content in repo.files.items():
            assert not any(p.encode() in content for p in machine_paths), name
    assert snapshot(finished_run) == before  # publishing only reads the run folder
    assert_no_token(hub, result, logs, finished_run)
    assert any(r.name.startswith("huggingface_hub") for r in logs)  # the library's debug logs were captured too


def test_republish_updates_the_repos(hub, tiny_llama, tmp_path, logs):
    run_dir = build_run(tmp_path / "run", tiny_llama)
    assert publish(run_dir, hub).exit_code == 0
    # a new winner: other weights, and a file the old one had is gone
    shutil.rmtree(run_dir / "best")
    build_run(tmp_path / "run2", tiny_llama, weights=(0.9, 0.2), winner_trial=2)
    shutil.copytree(tmp_path / "run2" / "best", run_dir / "best")
    shutil.copy(tmp_path / "run2" / "report.json", run_dir / "report.json")
    (run_dir / "best" / "generation_config.json").unlink()

    result = publish(run_dir, hub)
    assert result.exit_code == 0, result.output
    model = hub.repo("alice/tiny-merge")
    assert len(model.commits) == 3
    update = model.commits[-1]
    assert update.summary == "mergekit-evolve: winner of tiny (trial 2, held-out 0.4375)"
    assert update.deleted == ["generation_config.json"]
    assert "model.safetensors" in update.added and "config.json" not in update.added  # unchanged files are skipped
    assert model.files["model.safetensors"] == (run_dir / "best" / "model.safetensors").read_bytes()
    assert ".gitattributes" in model.files
    assert len(hub.repo("alice/tiny-merge-demo", "space").commits) == 3  # report.json changed
    # nothing changed: no empty commits
    assert publish(run_dir, hub).exit_code == 0
    assert len(model.commits) == 3
    assert_no_token(hub, result, logs)


def test_dry_run_writes_exactly_what_is_uploaded_and_sends_nothing(hub, finished_run, tmp_path):
    out = tmp_path / "plan"
    result = publish(finished_run, hub, "--dry-run", str(out))
    assert result.exit_code == 0, result.output
    assert hub.requests == []
    assert_no_token(hub, result, [], out)
    assert "Space variable MODEL_ID=alice/tiny-merge" in result.output
    assert "model.safetensors" in result.output and "app.py" in result.output

    assert publish(finished_run, hub).exit_code == 0
    for folder, repo in (("model", hub.repo("alice/tiny-merge")),
                         ("space", hub.repo("alice/tiny-merge-demo", "space"))):
        written = {p.relative_to(out / folder).as_posix(): p.read_bytes() for p in (out / folder).rglob("*")
                   if p.is_file()}
        assert written == {k: v for k, v in repo.files.items() if k != ".gitattributes"}
    # a second dry run into the same folder replaces it; a folder holding other things is refused
    assert publish(finished_run, hub, "--dry-run", str(out)).exit_code == 0
    (out / "notes.txt").write_text("mine")
    refused = publish(finished_run, hub, "--dry-run", str(out))
    assert refused.exit_code == 1 and "holds other files" in refused.output


def test_repo_and_space_default_to_the_recipe_publish_section(hub, tiny_llama, tmp_path):
    recipe = RECIPE.replace("  license: apache-2.0\n",
                            "  license: mit\n  repo: alice-lab/merged\n  space: alice-lab/merged-demo\n")
    run_dir = build_run(tmp_path / "run", tiny_llama, recipe=recipe)
    result = CliRunner().invoke(cli, ["publish", str(run_dir), "--endpoint", hub.url], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert hub.repo("alice-lab/merged").owner == "alice-lab"
    assert "license: mit" in hub.repo("alice-lab/merged").files["README.md"].decode()
    assert hub.repo("alice-lab/merged-demo", "space").variables["MODEL_ID"]["value"] == "alice-lab/merged"


# --- failures: a clear message, exit 1, the run folder untouched, and the same command can be run again ---


def _failed(result, *phrases: str) -> None:
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]  # after the plan, one line says what went wrong
    assert message.startswith("Error: ") and "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in message, message


def test_no_token(hub, finished_run, monkeypatch, logs):
    monkeypatch.delenv("HF_TOKEN")
    before = snapshot(finished_run)
    result = publish(finished_run, hub)
    _failed(result, "no Hugging Face token", "HF_TOKEN", "hf auth login")
    assert hub.requests == [] and snapshot(finished_run) == before
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert publish(finished_run, hub).exit_code == 0


def test_offline_mode_is_named(hub, finished_run, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _failed(publish(finished_run, hub), "HF_HUB_OFFLINE is set")
    assert hub.requests == []


def test_expired_token(hub, finished_run, monkeypatch, logs):
    expired = "hf_" + secrets.token_hex(16)
    monkeypatch.setenv("HF_TOKEN", expired)
    before = snapshot(finished_run)
    result = publish(finished_run, hub)
    _failed(result, "rejected the token (401 Unauthorized)", "invalid or has expired", "run the same command again")
    assert expired not in result.output and not [r for r in logs if expired in r.getMessage()]
    assert hub.repos == {} and snapshot(finished_run) == before
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert publish(finished_run, hub).exit_code == 0


@pytest.mark.parametrize("exists, conflict_first", [(True, False), (True, True), (False, False)],
                         ids=["taken-403", "taken-409", "foreign-namespace-403"])
def test_name_of_someone_else(hub, finished_run, exists, conflict_first, logs):
    """403 or 409 on create (huggingface_hub then goes on if the repo exists); the upload is refused, nothing is
    written."""
    hub.conflict_first = conflict_first
    if exists:
        hub.add_repo("bob/tiny-merge", files={"README.md": b"bob's model"})
    before = snapshot(finished_run)
    args = ["publish", str(finished_run), "--repo", "bob/tiny-merge", "--endpoint", hub.url]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    _failed(result, "no write access to bob/tiny-merge (403)", "belongs to another user or organisation")
    assert snapshot(finished_run) == before
    if exists:
        assert hub.repo("bob/tiny-merge").files["README.md"] == b"bob's model"
        assert len(hub.repo("bob/tiny-merge").commits) == 1
    else:
        assert hub.repos == {}
    # the same command fails the same clear way, it does not trip over a half-done first attempt
    _failed(CliRunner().invoke(cli, args, catch_exceptions=False), "no write access to bob/tiny-merge (403)")
    assert_no_token(hub, result, logs, finished_run)


def test_network_error_during_the_upload(hub, finished_run, logs):
    hub.drop["commit"] = 1  # the model's files are sent, then the commit request's connection dies
    before = snapshot(finished_run)
    result = publish(finished_run, hub)
    _failed(result, "network error", "while uploading to alice/tiny-merge", "run the same command again to retry")
    model = hub.repo("alice/tiny-merge")
    assert len(model.commits) == 1 and set(model.files) == {".gitattributes"}  # nothing half-committed
    assert ("model", "alice/tiny-merge-demo") not in hub.repos and ("space", "alice/tiny-merge-demo") not in hub.repos
    assert snapshot(finished_run) == before

    retry = publish(finished_run, hub)
    assert retry.exit_code == 0, retry.output
    assert len(model.commits) == 2 and "model.safetensors" in model.files
    assert hub.repo("alice/tiny-merge-demo", "space").variables["MODEL_ID"]["value"] == "alice/tiny-merge"
    assert_no_token(hub, result, logs, finished_run)


def test_bad_repo_names_and_missing_repo(hub, finished_run):
    _failed(CliRunner().invoke(cli, ["publish", str(finished_run), "--endpoint", hub.url]),
            "no model repo: pass --repo")
    _failed(CliRunner().invoke(cli, ["publish", str(finished_run), "--repo", "no-namespace"]),
            "--repo: 'no-namespace' is not of the form owner/name")
    _failed(CliRunner().invoke(cli, ["publish", str(finished_run), "--repo", "a/b", "--space", "a/b--c"]), "--space: ")
    assert hub.requests == []


@pytest.mark.slow
def test_a_run_with_a_publish_section_writes_its_card_and_pushes_at_the_end(hub, tiny_llama, tmp_path, logs):
    from tiny_models import write_copy_task

    from mergekit_evolve.pipeline import RunOptions, run_recipe
    from mergekit_evolve.recipe.document import load_recipe

    write_copy_task(tmp_path)
    base, v1, v2 = tiny_llama
    recipe_path = tmp_path / "pushed.yml"
    recipe_path.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {v1}\n    parameters: {{weight: {{search: [0.0, 1.0]}}}}\n"
        f"  - model: {v2}\n    parameters: {{weight: {{search: [0.0, 1.0]}}}}\n"
        "dtype: float32\nevolve:\n  allow_constant_objectives: true\n  sampler: random\n  trials: 2\n"
        "  task_paths: [tasks]\n"
        "  objectives: [{task: tiny_copy, metric: 'acc,none', heldout_task: tiny_copy_heldout}]\n"
        "publish:\n  repo: alice/searched\n  space: alice/searched-demo\n  license: mit\n"
    )
    run_dir = tmp_path / "run"
    report = run_recipe(load_recipe(recipe_path), run_dir, RunOptions(show_progress=False))

    card = (run_dir / "best" / "README.md").read_text()
    assert "mergekit-evolve" in card and "model-index" in card and (run_dir / "best" / "history.png").is_file()
    assert 'model="alice/searched"' in card  # publish.repo names the model in the local card too
    model = hub.repo("alice/searched")
    assert model.files["README.md"].decode() == card
    assert model.files["model.safetensors"] == (run_dir / "best" / "model.safetensors").read_bytes()
    assert (f"(trial {report['winner']['trial']}, held-out {report['winner']['heldout']:.4f})"
            in model.commits[-1].summary)
    assert hub.repo("alice/searched-demo", "space").variables["MODEL_ID"]["value"] == "alice/searched"
    assert not [r for r in logs if TOKEN in r.getMessage()]


def test_private_flag_creates_private_repos_and_tells_how_the_space_reads_the_model(hub, finished_run):
    result = publish(finished_run, hub, "--private")
    assert result.exit_code == 0, result.output
    assert hub.repo("alice/tiny-merge").private and hub.repo("alice/tiny-merge-demo", "space").private
    assert "Space secret `HF_TOKEN`" in hub.repo("alice/tiny-merge-demo", "space").files["README.md"].decode()
    assert "(private if created)" in result.output


@pytest.mark.slow
def test_a_dry_run_publish_of_the_demo_holds_no_path_of_this_machine(tmp_path):
    """Every file of the model and Space repos, as `publish --dry-run` writes them, grepped for absolute paths."""
    repo = Path(__file__).resolve().parents[2]
    run_dir = tmp_path / "run"
    ran = CliRunner().invoke(cli, ["run", str(repo / "recipes" / "demo.yml"), "--trials", "2", "-o", str(run_dir),
                                   "--no-progress"])
    assert ran.exit_code == 0, ran.output
    out = tmp_path / "plan"
    result = CliRunner().invoke(cli, ["publish", str(run_dir), "--repo", "alice/demo-merge",
                                      "--space", "alice/demo-merge-demo",
                                      "--license", "lgpl-3.0", "--dry-run", str(out)])
    assert result.exit_code == 0, result.output
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"model/README.md", "model/mergekit_config.yml", "space/space_config.json", "space/report.json"} <= {
        p.relative_to(out).as_posix() for p in files}
    for path in files:
        found = re.findall(rb"(?:/(?:home|root|tmp|work|Users|private|var)/|[A-Za-z]:\\\\)[^\s\"'`]*",
                           path.read_bytes())
        assert not found, f"{path.relative_to(out)}: {found[:3]}"
    card = (out / "model" / "README.md").read_text()
    assert "local folder `demo/models/copy`" in card and "base_model" not in yaml.safe_load(card.split("---")[1])
    assert yaml.safe_load((out / "model" / "mergekit_config.yml").read_text())["base_model"] == "demo/models/base"
