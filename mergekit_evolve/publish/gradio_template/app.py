"""Gradio demo of a model found by mergekit-evolve: chat with it, compare it with its parents, see the search.

Standalone on purpose (a Hugging Face Space runs this file with only requirements.txt installed).
It reads ``space_config.json`` beside it, or the file named by ``MERGEKIT_EVOLVE_SPACE_CONFIG``; the
Space variable ``MODEL_ID`` overrides the merged model's id. ``mergekit-evolve space RUN_DIR`` runs
this same file on a local run folder.
"""

from __future__ import annotations

import gc
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

try:  # the Hub's `spaces` package: on ZeroGPU hardware a GPU is attached only inside @spaces.GPU functions
    import spaces
except ImportError:
    spaces = None

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


ZERO_GPU = spaces is not None and bool(os.environ.get("SPACES_ZERO_GPU"))
GPU_SECONDS = 120  # what one ZeroGPU request may use: loading a parent and generating


class Models:
    """One model in memory at a time: asking for another releases the one loaded, so the Space needs room for
    the largest model only. A lock keeps a generation's model from being swapped out under it."""

    def __init__(self, device: str | None):
        self.device = device or ("cuda" if torch.cuda.is_available() or ZERO_GPU else "cpu")
        self.loaded: tuple[str, Any, Any] | None = None  # model id, model, tokenizer
        self.lock = threading.Lock()

    @property
    def current(self) -> str | None:
        return self.loaded[0] if self.loaded else None

    def _get(self, model_id: str) -> tuple[Any, Any]:
        if self.current != model_id:
            self.release()
            LOG.info("loading %s on %s", model_id, self.device)
            tokenizer = AutoTokenizer.from_pretrained(model_id)
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto").to(self.device).eval()
            self.loaded = (model_id, model, tokenizer)
        assert self.loaded is not None
        return self.loaded[1], self.loaded[2]

    def release(self) -> None:
        if self.loaded is not None:
            LOG.info("releasing %s", self.loaded[0])
            self.loaded = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def stream(self, model_id: str, messages: list[dict[str, str]], max_new_tokens: int,
               temperature: float) -> Iterator[str]:
        """The reply so far, growing as tokens arrive (greedy when temperature is 0)."""
        with self.lock:
            yield from self._stream(model_id, messages, max_new_tokens, temperature)

    def _stream(self, model_id: str, messages: list[dict[str, str]], max_new_tokens: int,
                temperature: float) -> Iterator[str]:
        model, tokenizer = self._get(model_id)
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)
        else:  # a base model: complete the last message as plain text
            ids = tokenizer(messages[-1]["content"], return_tensors="pt")
        ids = {k: v.to(self.device) for k, v in ids.items()}
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        worker = threading.Thread(
            target=model.generate,
            kwargs={**ids, "max_new_tokens": int(max_new_tokens), "streamer": streamer, "pad_token_id": pad,
                    **sampling},
        )
        worker.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text
        worker.join()


def on_gpu(fn: Any) -> Any:
    """``fn`` as a ZeroGPU task when the Space runs there; unchanged elsewhere."""
    return spaces.GPU(duration=GPU_SECONDS)(fn) if ZERO_GPU else fn


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


COMPARE_COLUMNS = 2  # outputs side by side; more wrap onto the next row, so a laptop screen fits them
CSS = "#scores {max-width: 100%; overflow-x: auto} .gradio-container {max-width: 1280px !important}"


def build_demo(settings: dict[str, Any]) -> gr.Blocks:
    models = Models(settings.get("device"))
    merged = settings["model"]
    parents = {p["label"]: p["model"] for p in settings.get("parents", [])}
    title = settings.get("title") or _label(merged)
    examples = settings.get("examples") or []

    with gr.Blocks(title=title, css=CSS, fill_width=True) as demo:
        gr.Markdown(f"## {title}\n{settings.get('description', '')} Merged model: `{merged}`.")
        with gr.Accordion("Generation settings", open=False):
            with gr.Row():
                max_new_tokens = gr.Slider(1, 1024, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="max new tokens")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")

        with gr.Tab("Chat", id="chat"):

            @on_gpu
            def chat(message: str, history: list[dict[str, Any]], max_new: int, temp: float) -> Iterator[str]:
                turns = [{"role": m["role"], "content": _text(m["content"])} for m in history]
                yield from models.stream(merged, turns + [{"role": "user", "content": message}], max_new, temp)

            gr.ChatInterface(
                chat,
                chatbot=gr.Chatbot(label=title, elem_id="chatbot", height=320),
                textbox=gr.Textbox(placeholder="Type a message and press Enter", elem_id="chat-input", submit_btn=True),
                additional_inputs=[max_new_tokens, temperature],
                examples=[[e] for e in examples] or None,
                cache_examples=False,
            )

        with gr.Tab("Compare with parents", id="compare"):
            local = settings.get("local_parents") or []
            if local:
                gr.Markdown(
                    f"Not on the Hub, so not loaded here: {', '.join(f'`{m}`' for m in local)}. "
                    "The recipe's `publish.hub_ids` names the Hub id of a local folder.",
                    elem_id="local-parents",
                )
            if parents:
                default = [p for p in settings.get("compare_default", []) if p in parents] or list(parents)[:1]
                chosen = gr.CheckboxGroup(list(parents), value=default,
                                          label="parents to compare (loaded one at a time)",
                                          elem_id="compare-parents")
                prompt = gr.Textbox(label="prompt", elem_id="compare-prompt", value=examples[0] if examples else "")
                run = gr.Button("Generate with each model", variant="primary", elem_id="compare-run")
                labels = [MERGED_LABEL, *parents]
                boxes = []
                for start in range(0, len(labels), COMPARE_COLUMNS):
                    with gr.Row():
                        for i, label in enumerate(labels[start:start + COMPARE_COLUMNS], start):
                            elem = "out-merged" if i == 0 else f"out-parent-{i - 1}"
                            boxes.append(gr.Textbox(label=label, lines=5, max_lines=12, elem_id=elem,
                                                    visible=i == 0 or label in default))

                @on_gpu
                def compare(text: str, picked: list[str], max_new: int, temp: float) -> Iterator[list[str]]:
                    outputs = [""] * len(boxes)
                    targets = [(0, merged)] + [(i + 1, parents[p]) for i, p in enumerate(parents) if p in picked]
                    targets.sort(key=lambda t: t[1] != models.current)  # start with the model in memory: one load fewer
                    for slot, model_id in targets:
                        for partial in models.stream(model_id, [{"role": "user", "content": text}], max_new, temp):
                            outputs[slot] = partial
                            yield list(outputs)

                chosen.change(lambda picked: [gr.update(visible=i == 0 or labels[i] in picked)
                                              for i in range(len(boxes))],
                              chosen, boxes)
                run.click(compare, [prompt, chosen, max_new_tokens, temperature], boxes)
                prompt.submit(compare, [prompt, chosen, max_new_tokens, temperature], boxes)
            elif not local:
                gr.Markdown("This merge has no parent models to compare with.")

        with gr.Tab("Search history", id="history"):
            with gr.Row():
                if settings.get("history") and Path(settings["history"]).is_file():
                    gr.Image(settings["history"], label="objective of every trial and the best so far",
                             elem_id="history-plot", height=320)
                if settings.get("pareto") and Path(settings["pareto"]).is_file():
                    gr.Image(settings["pareto"], label="Pareto front of the objectives", elem_id="pareto-plot",
                             height=320)
            if settings.get("report") and Path(settings["report"]).is_file():
                headers, rows = score_table(json.loads(_read(settings["report"])))
                gr.Dataframe(value=rows, headers=headers, label="winner vs sources (held-out is the score to quote)",
                             elem_id="scores", wrap=True, max_height=320)
            with gr.Accordion("mergekit config of the winner", open=False):
                gr.Code(_read(settings.get("config")), language="yaml")
            with gr.Accordion("recipe", open=False):
                gr.Code(_read(settings.get("recipe")), language="yaml")
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
