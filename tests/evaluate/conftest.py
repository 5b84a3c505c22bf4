"""Fixtures the objective tests share."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def judge_model(tmp_path_factory) -> Path:
    """A tiny random causal LM over the tests' character tokenizer, other weights than the merged family's."""
    from tests.tiny_models import make_family

    return make_family(tmp_path_factory.mktemp("judge"), "llama", variants=0, seed=7)[0]
