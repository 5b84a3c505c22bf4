"""Gradio demo of a model found by mergekit-evolve: chat with it, compare it with its parents, see the search.

Standalone on purpose (a Hugging Face Space runs this file with only requirements.txt installed).
It reads ``space_config.json`` beside it, or the file named by ``MERGEKIT_EVOLVE_SPACE_CONFIG``; the
Space variable ``MODEL_ID`` overrides the merged model's id. ``mergekit-evolve space RUN_DIR`` runs
this same file on a local run folder.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

LOG = logging.getLogger("mergekit_evolve.space")
CONFIG_ENV = "MERGEKIT_EVOLVE_SPACE_CONFIG"
CONFIG_FILE = "space_config.json"
ASSETS = ("history", "pareto", "report", "config", "recipe")
DEFAULT_MAX_NEW_TOKENS = 64
MERGED_LABEL = "merged"


def load_settings(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The settings JSON, with asset paths made absolute and ``MODEL_ID`` applied."""
    path = Path(path or os.environ.get(CONFIG_ENV) or Path(__file__).resolve().parent / CONFIG_FILE)
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings["model"] = os.environ.get("MODEL_ID") or settings["model"]
    for key in ASSETS:
        if settings.get(key):
            settings[key] = str(path.parent / settings[key])
    return settings


class Models:
    """Models and tokenizers loaded on first use and kept; one lock so two requests never load twice."""

    def __init__(self, device: str | None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._loaded: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def get(self, model_id: str) -> tuple[Any, Any]:
        with self._lock:
            if model_id not in self._loaded:
                LOG.info("loading %s on %s", model_id, self.device)
                tokenizer = AutoTokenizer.from_pretrained(model_id)
                model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto").to(self.device).eval()
                self._loaded[model_id] = (model, tokenizer)
            return self._loaded[model_id]

    def stream(self, model_id: str, messages: list[dict[str, str]], max_new_tokens: int, temperature: float) -> Iterator[str]:
        """The reply so far, growing as tokens arrive (greedy when temperature is 0)."""
        model, tokenizer = self.get(model_id)
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        else:  # a base model: complete the last message as plain text
            ids = tokenizer(messages[-1]["content"], return_tensors="pt")
        ids = {k: v.to(self.device) for k, v in ids.items()}
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        worker = threading.Thread(
            target=model.generate,
            kwargs={**ids, "max_new_tokens": int(max_new_tokens), "streamer": streamer, "pad_token_id": pad, **sampling},
        )
        worker.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text
        worker.join()


def _label(model: str) -> str:
    return os.path.basename(model.rstrip("/")) if os.path.isabs(model) else model


def score_table(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Winner and sources on the search and held-out splits, per objective when there are several."""
    objectives = list(report["winner"]["per_objective"]["search"])
    headers = ["model", "search", "held-out"]
    if len(objectives) > 1:
        headers += [f"{o} ({split})" for o in objectives for split in ("search", "held-out")]

    def row(label: str, entry: dict[str, Any]) -> list[Any]:
        cells = [label, round(entry["search"], 4), round(entry["heldout"], 4)]
        if len(objectives) > 1:
            cells += [round(entry["per_objective"][s][o], 4) for o in objectives for s in ("search", "heldout")]
        return cells

    rows = [row(f"{MERGED_LABEL} (trial {report['winner']['trial']})", report["winner"])]
    rows += [row(_label(name), entry) for name, entry in report["sources"].items()]
    return headers, rows


def _read(path: str | None) -> str:
    return Path(path).read_text(encoding="utf-8") if path and Path(path).is_file() else ""


def build_demo(settings: dict[str, Any]) -> gr.Blocks:
    models = Models(settings.get("device"))
    merged = settings["model"]
    parents = {p["label"]: p["model"] for p in settings.get("parents", [])}
    title = settings.get("title") or _label(merged)

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\n{settings.get('description', '')}\n\nMerged model: `{merged}`")
        with gr.Row():
            max_new_tokens = gr.Slider(1, 1024, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="max new tokens")
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")

        with gr.Tab("Chat", id="chat"):

            def chat(message: str, history: list[dict[str, Any]], max_new: int, temp: float) -> Iterator[str]:
                turns = [{"role": m["role"], "content": _text(m["content"])} for m in history]
                yield from models.stream(merged, turns + [{"role": "user", "content": message}], max_new, temp)

            gr.ChatInterface(
                chat,
                chatbot=gr.Chatbot(label=title, elem_id="chatbot", height=360),
                textbox=gr.Textbox(placeholder="Type a message and press Enter", elem_id="chat-input", submit_btn=True),
                additional_inputs=[max_new_tokens, temperature],
            )

        with gr.Tab("Compare with parents", id="compare"):
            if not parents:
                gr.Markdown("None of the parent models is on the Hub, so there is nothing to compare with here.")
            chosen = gr.CheckboxGroup(list(parents), value=list(parents)[:3], label="parents to compare")
            prompt = gr.Textbox(label="prompt", elem_id="compare-prompt")
            run = gr.Button("Generate with each model", variant="primary", elem_id="compare-run")
            with gr.Row():
                boxes = [gr.Textbox(label=MERGED_LABEL, lines=8, elem_id="out-merged")]
                boxes += [gr.Textbox(label=label, lines=8, elem_id=f"out-parent-{i}") for i, label in enumerate(parents)]

            def compare(text: str, picked: list[str], max_new: int, temp: float) -> Iterator[list[str]]:
                outputs = [""] * len(boxes)
                targets = [(0, merged)] + [(i + 1, parents[p]) for i, p in enumerate(parents) if p in picked]
                for slot, model_id in targets:
                    for partial in models.stream(model_id, [{"role": "user", "content": text}], max_new, temp):
                        outputs[slot] = partial
                        yield list(outputs)

            run.click(compare, [prompt, chosen, max_new_tokens, temperature], boxes)
            prompt.submit(compare, [prompt, chosen, max_new_tokens, temperature], boxes)

        with gr.Tab("Search history", id="history"):
            if settings.get("history") and Path(settings["history"]).is_file():
                gr.Image(settings["history"], label="objective of every trial and the best so far", elem_id="history-plot")
            if settings.get("pareto") and Path(settings["pareto"]).is_file():
                gr.Image(settings["pareto"], label="Pareto front of the objectives", elem_id="pareto-plot")
            if settings.get("report") and Path(settings["report"]).is_file():
                headers, rows = score_table(json.loads(_read(settings["report"])))
                gr.Dataframe(value=rows, headers=headers, label="winner vs sources", elem_id="scores")
            gr.Code(_read(settings.get("config")), language="yaml", label="mergekit config of the winner")
            gr.Code(_read(settings.get("recipe")), language="yaml", label="recipe")
    return demo


def _text(content: Any) -> str:
    """Gradio message content as plain text (it may be a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    build_demo(load_settings()).launch()
