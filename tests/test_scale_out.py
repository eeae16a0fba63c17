"""Rehearsals of what real jobs meet: a final save that fails, elastic restarts, two nodes, ZeRO-3."""

from __future__ import annotations

import errno
import os
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


def failing_save(model, processor, folder, precision=None, base=None):
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


# ---- several processes under torchrun (gloo on this CPU) ------------------------------------


def torchrun_command(config: Path, *launcher: str, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "phivision.cli.main", "train",
            str(config), *(["--resume", "auto"] if resume else [])]


def launch(command: list[str], **env_overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **env_overrides}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def two_process_values(model_dir, digits: Path, out: Path, **overrides) -> dict:
    values = {"global_batch_size": 8, "per_device_batch_size": 2, "max_steps": 8, "save_steps": 2,
              "save_total_limit": None, "lr_scheduler": "constant_with_warmup", **overrides}
    return base_config(model_dir, digits, out, **values)


def assert_same_weights(first: Path, second: Path) -> None:
    left, right = tensors(first), tensors(second)
    assert left.keys() == right.keys()
    assert all(torch.equal(left[name], right[name]) for name in left)


@pytest.fixture(scope="module")
def two_process_run(tiny_model_dir, digits, tmp_path_factory) -> Path:
    """The reference: one launcher, two processes, never interrupted."""
    folder = tmp_path_factory.mktemp("two-process")
    config = write_yaml(folder / "c.yaml", two_process_values(tiny_model_dir, digits, folder / "run"))
    finish(launch(torchrun_command(config, "--nproc_per_node=2", f"--master_port={free_port()}")))
    return folder / "run" / "model"


def worker_processes(launcher: subprocess.Popen) -> list:
    import psutil

    return [child for child in psutil.Process(launcher.pid).children(recursive=True)
            if "phivision.cli.main" in " ".join(child.cmdline())]


@pytest.mark.slow
def test_an_elastic_restart_after_a_killed_worker_resumes_bit_identically(tmp_path, tiny_model_dir, digits,
                                                                         two_process_run):
    out = tmp_path / "run"
    config = write_yaml(tmp_path / "c.yaml", two_process_values(tiny_model_dir, digits, out))
    launcher = launch(torchrun_command(config, "--nproc_per_node=2", "--max-restarts=1", "--rdzv_backend=c10d",
                                       f"--rdzv_endpoint=127.0.0.1:{free_port()}", resume=True),
                      TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    deadline = time.time() + 300
    while not (out / "checkpoint-2").is_dir():
        assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()[-4000:]
        time.sleep(0.05)
    workers = worker_processes(launcher)
    assert len(workers) == 2
    workers[-1].send_signal(signal.SIGKILL)
    output = finish(launcher)
    assert output.count("phivision train: full") == 2, output[-4000:]  # the job started twice
    assert_same_weights(two_process_run, out / "model")


@pytest.mark.slow
def test_restarts_through_torchruns_shared_store_are_refused_up_front(tmp_path, tiny_model_dir, digits):
    config = write_yaml(tmp_path / "c.yaml", two_process_values(tiny_model_dir, digits, tmp_path / "run"))
    launcher = launch(torchrun_command(config, "--nproc_per_node=2", "--max-restarts=1",
                                       f"--master_port={free_port()}"))
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode != 0
    assert ("phivision train: error: torchrun --max-restarts=1 needs --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT "
            "and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1") in output
    assert "[rank0]: Traceback" not in output and not (tmp_path / "run" / "checkpoint-2").exists()


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_like_two_processes_on_one(tmp_path, tiny_model_dir, digits, two_process_run):
    out = tmp_path / "run"
    config = write_yaml(tmp_path / "c.yaml", two_process_values(tiny_model_dir, digits, out))
    port = free_port()
    nodes = [launch(torchrun_command(config, "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                                     "--master_addr=127.0.0.1", f"--master_port={port}")) for rank in (0, 1)]
    for node in nodes:
        finish(node)
    assert_same_weights(two_process_run, out / "model")


@pytest.mark.slow
def test_zero3_evaluates_the_task_metric_and_saves_the_official_layout(tmp_path, tiny_model_dir, digits):
    from phivision.model.weights import load_model
    from phivision.train.report import read_metrics

    eval_keys = {"eval_data": str(digits / "small_test.jsonl"), "eval_steps": 2, "eval_samples": 5,
                 "max_new_tokens": 3}
    plain = run_training(load_config(None, base=base_config(tiny_model_dir, digits, tmp_path / "plain", max_steps=1,
                                                            save_steps=10)))
    values = two_process_values(tiny_model_dir, digits, tmp_path / "run", max_steps=4, deepspeed="zero3", **eval_keys)
    config = write_yaml(tmp_path / "c.yaml", values)
    finish(launch(torchrun_command(config, "--nproc_per_node=2", f"--master_port={free_port()}")))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "eval_accuracy" in r] == [2, 4]
    model_dir = tmp_path / "run" / "model"
    assert files_under(model_dir) == files_under(plain.model_dir)
    zero3, reference = tensors(model_dir), tensors(plain.model_dir)
    assert {k: (v.shape, v.dtype) for k, v in zero3.items()} == {k: (v.shape, v.dtype) for k, v in reference.items()}
    assert not torch.equal(zero3["lm_head.weight"], reference["lm_head.weight"])  # trained, not the partitions
    load_model(model_dir)
