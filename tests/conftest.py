"""Shared fixtures: one tiny random model folder per test session (real Phi-3 vocabulary)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from phivision.processing.folder import write_random_model

    return write_random_model(tmp_path_factory.mktemp("tiny-model"), preset="tiny", num_crops=4, seed=0)


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    from phivision.processing.processor import Phi3VProcessor

    return Phi3VProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from phivision.model.weights import load_model

    return load_model(tiny_model_dir).eval()
