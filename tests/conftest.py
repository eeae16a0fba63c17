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


# ---- a trained tiny model, shared by test_eval.py and test_export_predict.py ------------------


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """64 real training digits, 12 test digits and 7 more (an odd count, for two processes)."""
    from phivision.data.digits import write_digits_task

    root = tmp_path_factory.mktemp("eval-digits")
    write_digits_task(root)
    train = (root / "train.jsonl").read_text().splitlines()
    test = (root / "test.jsonl").read_text().splitlines()
    (root / "small_train.jsonl").write_text("\n".join(train[:64]) + "\n")
    (root / "lora_train.jsonl").write_text("\n".join(train[:8]) + "\n")
    (root / "small_test.jsonl").write_text("\n".join(test[:12]) + "\n")
    (root / "odd_test.jsonl").write_text("\n".join(test[12:19]) + "\n")
    return root


@pytest.fixture(scope="session")
def trained(tiny_model_dir, digits, tmp_path_factory):
    """A full fine-tune that has learned the answer format: a digit word, then `<|end|>`."""
    from helpers import train_run

    return train_run(tiny_model_dir, digits, tmp_path_factory.mktemp("full-run") / "run")


@pytest.fixture(scope="session")
def trained_model(trained):
    from phivision.evaluate.generate import load_for_inference

    return load_for_inference(trained.model_dir, precision="fp32")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy machine threads wait on each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
