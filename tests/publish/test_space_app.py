"""The demo Space (mergekit_evolve/publish/gradio_template/app.py): its settings, and the app itself driven in a
headless Chromium."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import types
import urllib.request
import weakref
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_card import RECIPE, build_run
from tiny_models import write_copy_task

from mergekit_evolve.cli import cli
from mergekit_evolve.publish.gradio_app import (
    TEMPLATE_DIR,
    local_settings,
    space_files,
    suggested_hardware,
)
from mergekit_evolve.publish.hub import plan_publish, write_plan
from mergekit_evolve.publish.run_files import RunFiles

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("space_app", TEMPLATE_DIR / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(tiny_llama, tmp_path_factory) -> Path:
    """A finished run of a recipe beside its tiny_copy task, so the Space has example prompts."""
    project = tmp_path_factory.mktemp("space")
    write_copy_task(project)
    run = build_run(project / "run", tiny_llama,
                    recipe=RECIPE.replace("publish:\n", "  task_paths: [tasks]\npublish:\n"))
    (run / "run.json").write_text(json.dumps({"fingerprint": "x", "recipe": str(project / "recipe.yml")}))
    return run


def test_settings_file_resolves_assets_and_the_model_variable(app, tmp_path, monkeypatch):
    (tmp_path / "space_config.json").write_text(json.dumps({"model": "me/merged", "history": "history.png",
                                                            "report": None}))
    monkeypatch.delenv("MODEL_ID", raising=False)
    monkeypatch.setenv(app.CONFIG_ENV, str(tmp_path / "space_config.json"))
    settings = app.load_settings()
    assert settings["model"] == "me/merged" and settings["history"] == str(tmp_path / "history.png")
    assert settings["report"] is None
    monkeypatch.setenv("MODEL_ID", "me/other")  # the Space variable the publish step sets wins
    assert app.load_settings()["model"] == "me/other"


def test_score_table_lists_winner_and_sources(app, run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    headers, rows = app.score_table(report)
    assert headers == ["model", "search", "held-out"]
    assert rows[0] == [f"merged (trial {report['winner']['trial']})", report["winner"]["search"],
                       report["winner"]["heldout"]]
    assert [r[0] for r in rows[1:]] == [Path(s).name for s in report["sources"]]


def test_local_settings_use_the_run_and_its_local_sources(run_dir, tiny_llama):
    settings = local_settings(RunFiles(run_dir))
    assert settings["model"] == str((run_dir / "best").resolve()) and settings["device"] == "cpu"
    assert [p["label"] for p in settings["parents"]] == ["base", "v1", "v2"]
    assert [p["model"] for p in settings["parents"]] == [str(m) for m in tiny_llama]
    assert settings["compare_default"] == ["v1", "v2"]  # the best two on held-out data (build_run's made-up scores)
    for key in ("history", "report", "config", "recipe"):
        assert Path(settings[key]).is_file(), key


def test_published_space_lists_only_hub_parents(tmp_path, tiny_llama):
    run_dir = build_run(tmp_path / "run", tiny_llama)
    report = json.loads((run_dir / "report.json").read_text())
    report["sources"] = {("org/expert" if k == str(tiny_llama[1]) else k): v for k, v in report["sources"].items()}
    (run_dir / "report.json").write_text(json.dumps(report))
    files = space_files(RunFiles(run_dir), "me/merged", "me/merged-demo", private=True, license="mit")
    settings = json.loads(files["space_config.json"])
    assert settings["parents"] == [{"label": "org/expert", "model": "org/expert"}]
    assert settings["local_parents"] == ["base", "v2"] and settings["compare_default"] == ["org/expert"]
    assert settings["model"] == "me/merged" and settings["history"] == "history.png"
    readme = files["README.md"].decode()
    assert "models:\n- me/merged\n- org/expert\n" in readme and "Space secret `HF_TOKEN`" in readme
    assert "suggested_hardware: cpu-basic\n" in readme  # a tiny model


def test_suggested_hardware_follows_the_model_size():
    assert [suggested_hardware(int(b * 1e9)) for b in (0.5, 3, 15, 28, 60, 140)] == [
        "cpu-basic", "t4-small", "l4x1", "l40sx1", "a100-large", "a100-large"]


def test_the_app_keeps_one_model_in_memory(app, tiny_llama):
    models = app.Models("cpu")
    first = "".join(models.stream(str(tiny_llama[1]), [{"role": "user", "content": "cp:ab="}], 4, 0.0))
    loaded = weakref.ref(models.loaded[1])
    list(models.stream(str(tiny_llama[2]), [{"role": "user", "content": "cp:ab="}], 4, 0.0))
    assert models.current == str(tiny_llama[2]) and loaded() is None  # the first parent was released
    assert "".join(models.stream(str(tiny_llama[1]), [{"role": "user", "content": "cp:ab="}], 4, 0.0)) == first


def test_the_app_uses_zero_gpu_when_the_space_runs_there(app, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(GPU=lambda duration: lambda fn: calls.append(duration) or fn)
    monkeypatch.setattr(app, "spaces", fake)
    monkeypatch.setattr(app, "ZERO_GPU", True)
    assert app.on_gpu(len) is len and calls == [app.GPU_SECONDS]
    monkeypatch.setattr(app, "ZERO_GPU", False)
    assert app.on_gpu(len) is len and calls == [app.GPU_SECONDS]


def test_the_uploaded_space_folder_builds_its_app(app, run_dir, tmp_path, monkeypatch):
    """The Space as publish writes it (dry run) finds its assets beside app.py and the model via MODEL_ID."""
    write_plan(plan_publish(run_dir, "me/merged", "me/merged-demo"), tmp_path / "out")
    space = tmp_path / "out" / "space"
    monkeypatch.delenv(app.CONFIG_ENV, raising=False)
    monkeypatch.setenv("MODEL_ID", str(run_dir / "best"))  # what the Space variable does on the Hub
    settings = app.load_settings(space / "space_config.json")
    assert settings["model"] == str(run_dir / "best")
    for key in ("history", "report", "config", "recipe"):
        assert Path(settings[key]).parent == space and Path(settings[key]).is_file(), key
    assert settings["pareto"] is None
    demo = app.build_demo(settings)
    assert ({"Chat", "Compare with parents", "Search history"}
            <= {getattr(b, "label", None) for b in demo.blocks.values()})


def test_space_command_refuses_a_folder_without_a_winner(tmp_path):
    result = CliRunner().invoke(cli, ["space", str(tmp_path)])
    assert result.exit_code == 1 and "holds no merged model: run the search first" in result.output


# --- the app in a real browser -------------------------------------------------------------------


def greedy_reply(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """What the app must show: computed here with transformers directly, not through the app."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def squash(text: str) -> str:
    """The character tokenizer decodes with spaces between tokens and HTML collapses runs of them."""
    return "".join(text.split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(run_dir, tmp_path):
    """``mergekit-evolve space RUN_DIR`` running, as a user starts it."""
    port = free_port()
    log = open(tmp_path / "space.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mergekit_evolve", "space", str(run_dir), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "space.log").read_text()
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the app did not come up:\n" + (tmp_path / "space.log").read_text()
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()  # the command stops its app child on SIGTERM
        # generous: the command's own exit (torch and lm-eval imported) slows down a lot on a loaded machine
        proc.wait(timeout=120)
        log.close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (install it with .ci/browser-deps.sh)")
def test_space_in_a_browser(app, run_dir, tiny_llama, served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    n = app.DEFAULT_MAX_NEW_TOKENS
    chat_prompt, compare_prompt = "cp:abcd=", "hello"
    expected_chat = greedy_reply(run_dir / "best", chat_prompt, n)
    expected = {"merged": greedy_reply(run_dir / "best", compare_prompt, n)}
    expected |= {m.name: greedy_reply(m, compare_prompt, n) for m in tiny_llama}
    assert squash(expected_chat) and all(map(squash, expected.values())), "the fixture model must say something"

    settings = local_settings(RunFiles(run_dir))
    examples, default = settings["examples"], settings["compare_default"]
    assert examples and examples[0].startswith("cp:") and default == ["v1", "v2"]

    def fits(page) -> None:  # a laptop screen: nothing wider than the window
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "the page scrolls sideways"

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.goto(served, wait_until="domcontentloaded")  # no "networkidle": the page asks for web fonts offline

        # chat: the recipe's task prompts are offered as examples; a prompt in, the model's own greedy reply out
        expect(page.get_by_text(examples[0]).first).to_be_visible(timeout=60_000)
        fits(page)
        box = page.locator("#chat-input textarea")
        box.fill(chat_prompt)
        box.press("Enter")
        expect(page.locator('[data-testid="user"]').last).to_contain_text(chat_prompt, timeout=60_000)
        bot = page.locator('[data-testid="bot"]').last
        expect(bot).to_be_visible(timeout=120_000)
        page.wait_for_function(
            "([sel, want]) => { const m = [...document.querySelectorAll(sel)].pop();"
            " return m && m.innerText.replace(/\\s+/g, '') === want; }",
            arg=['[data-testid="bot"]', squash(expected_chat)], timeout=120_000,
        )
        page.screenshot(path=str(tmp_path / "chat.png"))

        # compare: the best parents on held-out data are ticked, the others hidden until ticked
        page.get_by_role("tab", name="Compare with parents").click()
        boxes = {"merged": "#out-merged", **{m.name: f"#out-parent-{i}" for i, m in enumerate(tiny_llama)}}
        expect(page.locator(boxes["base"])).to_be_hidden()
        for label in default:
            expect(page.locator(f"{boxes[label]} label").first).to_contain_text(label)
        expect(page.locator("#compare-prompt textarea")).to_have_value(examples[0])
        page.locator("#compare-parents").get_by_label("base").check()  # the visitor adds the third parent
        expect(page.locator(boxes["base"])).to_be_visible()
        fits(page)
        page.locator("#compare-prompt textarea").fill(compare_prompt)
        page.locator("#compare-run").click()
        for label, sel in boxes.items():
            expect(page.locator(f"{sel} label").first).to_contain_text(label)
            page.wait_for_function(
                "([sel, want]) => document.querySelector(sel + ' textarea').value.replace(/\\s+/g, '') === want",
                arg=[sel, squash(expected[label])], timeout=120_000,
            )
        page.screenshot(path=str(tmp_path / "compare.png"))

        # the search: plot, scores table, config
        page.get_by_role("tab", name="Search history").click()
        plot = page.locator("#history-plot img")
        expect(plot).to_be_visible()
        assert plot.evaluate("img => img.complete && img.naturalWidth > 0")
        report = json.loads((run_dir / "report.json").read_text())
        table = page.locator("#scores")
        for value in (report["winner"]["heldout"], *[s["heldout"] for s in report["sources"].values()]):
            expect(table).to_contain_text(str(value))
        fits(page)
        page.get_by_text("mergekit config of the winner").click()
        expect(page.get_by_text("merge_method: task_arithmetic").first).to_be_visible()
        shot = tmp_path / "space-history.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    print(f"screenshots: {tmp_path / 'chat.png'}, {shot}")
