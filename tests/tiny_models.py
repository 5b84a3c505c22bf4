"""Tiny random model families built on the fly: a base and fine-tune-like variants of it."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = ["<pad>", "<unk>", "<s>", "</s>"] + list("abcdefghijklmnopqrstuvwxyz0123456789 :=")

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    ),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    ),
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=4, head_dim=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    ),
    "phi3": lambda: transformers.Phi3Config(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=0,
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=4, head_dim=8,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=len(VOCAB), n_embd=32, n_layer=4, n_head=4, n_positions=64, tie_word_embeddings=False,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
    ),
}


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_family(
    root: Path, arch: str = "llama", variants: int = 2, seed: int = 0,
    config: transformers.PretrainedConfig | None = None
) -> list[Path]:
    """``root/base`` plus ``root/v1..vN``: the base with different random task vectors."""
    torch.manual_seed(seed)
    config = config or CONFIGS[arch]()
    base = transformers.AutoModelForCausalLM.from_config(config)
    tok = char_tokenizer()
    paths = []
    for i in range(variants + 1):
        name = "base" if i == 0 else f"v{i}"
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.load_state_dict(base.state_dict())
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        out = root / name
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        paths.append(out)
    return paths


def write_copy_task(folder: Path, n_search: int = 16, n_heldout: int = 16) -> Path:
    """A local lm-eval task pair (``tiny_copy`` / ``tiny_copy_heldout``) with its data in ``folder/data``."""
    import json
    import random

    rng = random.Random(0)
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, n in (("search", n_search), ("heldout", n_heldout)):
        with open(folder / "data" / f"copy_{split}.jsonl", "w") as fp:
            for _ in range(n):
                s = "".join(rng.choice("abcdef") for _ in range(4))
                fp.write(json.dumps({"prompt": f"cp:{s}=", "answer": s}) + "\n")
        name = "tiny_copy" if split == "search" else "tiny_copy_heldout"
        (folder / "tasks" / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/copy_{split}.jsonl\n"
            "test_split: test\noutput_type: loglikelihood\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{answer}}\"\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        )
    return folder / "tasks"


def make_lora_adapter(base: Path, out: Path, seed: int = 0, r: int = 2, dtype: torch.dtype = torch.float32,
                      **config) -> Path:
    """A PEFT LoRA adapter over ``base`` with random, nonzero factors (B starts at zero in PEFT)."""
    import peft

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    config.setdefault("target_modules", ["q_proj", "down_proj"])
    lora = peft.LoraConfig(r=r, lora_alpha=2 * r, **config)
    model = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out
