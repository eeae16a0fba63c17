"""Faults around folders, met as a user meets them: a second run into a busy output folder,
exports and init-tiny onto existing weights, file modes, broken model folders, configs that would
learn nothing, an existing eval output file, a closed pipe. Each is a subprocess whose exit code,
output (never a traceback) and files on disk are checked."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from test_train import base_config, digits_data, phivision_command, wait_for, write_yaml  # noqa: F401 (fixture)

LOCK_NAME = ".lock"  # the lock file a user may be told to delete


def phivision(*args: str, umask: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, as a user runs it; asserts it printed no traceback."""
    completed = subprocess.run(phivision_command(*args), capture_output=True, text=True, timeout=timeout,
                               preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    assert "Traceback" not in completed.stdout + completed.stderr, completed.stderr
    return completed


def one_line_error(completed: subprocess.CompletedProcess, command: str) -> str:
    """The error a failed command printed: exit 2, a single `phivision CMD: error: ...` line."""
    assert completed.returncode == 2, completed.stdout + completed.stderr
    lines = [line for line in completed.stderr.splitlines() if line.startswith(f"phivision {command}: error: ")]
    assert len(lines) == 1, completed.stderr
    return lines[0]


def fingerprint(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def train_config(tmp_path: Path, tiny_model_dir, digits_data, name: str = "c.yaml", **overrides) -> Path:
    values = base_config(tiny_model_dir, digits_data, tmp_path / "run", **overrides)
    return write_yaml(tmp_path / name, values)


# ---- one run per output folder --------------------------------------------------------------


def test_a_second_run_into_a_busy_folder_refuses_naming_the_first(tmp_path, tiny_model_dir, digits_data):
    config = train_config(tmp_path, tiny_model_dir, digits_data, max_steps=100000, save_steps=100000)
    first = subprocess.Popen(phivision_command("train", str(config)), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(tmp_path / "run" / "metrics.jsonl", first)
        second = phivision("train", str(config))
        error = one_line_error(second, "train")
        assert f"is in use by another run (pid {first.pid} on {socket.gethostname()}" in error
    finally:
        first.send_signal(signal.SIGINT)
        output, _ = first.communicate(timeout=120)
    assert first.returncode == 130, output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if "loss" in record]
    assert steps == sorted(set(steps))  # one writer
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released on Ctrl-C


def write_lock(folder: Path, host: str, pid: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01 00:00:00 UTC"}))
    return path


def test_a_lock_left_by_a_dead_run_on_this_host_is_taken_over(tmp_path, tiny_model_dir, digits_data):
    gone = subprocess.Popen(["true"])
    gone.wait()
    write_lock(tmp_path / "run", socket.gethostname(), gone.pid)
    completed = phivision("train", str(train_config(tmp_path, tiny_model_dir, digits_data, max_steps=1)))
    assert completed.returncode == 0, completed.stderr
    assert f"taking over the lock of a run that is gone (pid {gone.pid}" in completed.stderr
    assert (tmp_path / "run" / "model").is_dir()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_refused_saying_how_to_remove_it(tmp_path, tiny_model_dir, digits_data):
    lock = write_lock(tmp_path / "run", "node-elsewhere", 1234)
    completed = phivision("train", str(train_config(tmp_path, tiny_model_dir, digits_data, max_steps=1)))
    error = one_line_error(completed, "train")
    assert "another machine (pid 1234 on node-elsewhere" in error and f"delete {lock}" in error
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # nothing written


def test_the_lock_is_released_when_training_fails(tmp_path, tiny_model_dir, digits_data):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"id": "x", "conversations": [{"images": ["missing.png"], "user": "q", "assistant": "a"}]}\n')
    completed = phivision("train", str(train_config(tmp_path, tiny_model_dir, digits_data, train_data=str(data))))
    assert "1 invalid sample(s)" in one_line_error(completed, "train")
    assert not (tmp_path / "run" / LOCK_NAME).exists()
