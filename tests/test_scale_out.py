"""Rehearsals of what real jobs meet: a final save that fails, elastic restarts, two nodes, ZeRO-3."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import base_config, files_under, free_port, tensors, write_yaml

from phivision.errors import PhivisionError
from phivision.train import run
from phivision.train.config import load_config
from phivision.train.run import run_training

# ---- the final model/ folder ----------------------------------------------------------------


def failing_save(model, processor, folder, precision=None):
    """Half a model folder, then a full disk."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_final_save_that_fails_midway_leaves_no_model_folder_and_resume_writes_it(
        tmp_path, tiny_model_dir, digits, monkeypatch):
    values = base_config(tiny_model_dir, digits, tmp_path / "run", max_steps=2, save_steps=2)
    with monkeypatch.context() as patch:
        patch.setattr(run, "save_model_folder", failing_save)
        with pytest.raises(PhivisionError, match="saving the final model to .*/model failed \\(No space left on "
                                                 "device\\); the checkpoints are intact: free disk space and run "
                                                 "again with --resume auto"):
            run_training(load_config(None, base=values))
    out = tmp_path / "run"
    assert not (out / "model").exists() and files_under(out / ".staging") == []
    run_training(load_config(None, base=values), resume="auto")
    assert (out / "model" / "model.safetensors").is_file()


def test_a_failed_save_keeps_the_earlier_model_whole_and_a_good_one_replaces_it(
        tmp_path, tiny_model_dir, digits, monkeypatch):
    values = base_config(tiny_model_dir, digits, tmp_path / "run", max_steps=2, save_steps=1, save_total_limit=None,
                         lr_scheduler="constant_with_warmup")
    out = tmp_path / "run"
    run_training(load_config(None, base=values))
    earlier = {name: (out / "model" / name).read_bytes() for name in files_under(out / "model")}
    with monkeypatch.context() as patch:
        patch.setattr(run, "save_model_folder", failing_save)
        with pytest.raises(PhivisionError, match="saving the final model"):
            run_training(load_config(None, base={**values, "max_steps": 3}), resume="auto")
    assert {name: (out / "model" / name).read_bytes() for name in files_under(out / "model")} == earlier
    run_training(load_config(None, base={**values, "max_steps": 3}), resume="auto")
    assert files_under(out / "model") == sorted(earlier)
    assert (out / "model" / "model.safetensors").read_bytes() != earlier["model.safetensors"]
    assert files_under(out / ".staging") == []
