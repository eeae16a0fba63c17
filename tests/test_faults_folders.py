"""Faults around folders, met as a user meets them: a second run into a busy output folder,
exports and init-tiny onto existing weights, file modes, broken model folders, configs that would
learn nothing, an existing eval output file, a closed pipe. Each is a command whose exit code,
output (never a traceback) and files on disk are checked: in a subprocess where processes matter
(a second run, locks of other pids, umasks, torchrun, a pipe), else in this process
(`phivision_in_process`)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import phivision_in_process
from test_train import base_config, digits_data, phivision_command, torchrun, wait_for, write_yaml  # noqa: F401

LOCK_NAME = ".lock"  # the lock file a user may be told to delete


def phivision(*args: str, umask: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, as a user runs it; asserts it printed no traceback."""
    completed = subprocess.run(phivision_command(*args), capture_output=True, text=True, timeout=timeout,
                               preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    assert "Traceback" not in completed.stdout + completed.stderr, completed.stderr
    return completed


def phivision_commands(*commands: list[str], umask: int) -> subprocess.CompletedProcess:
    """`phivision` commands in turn, in one child process under `umask` (one interpreter's imports, not one
    per command), stopping at the first that fails; asserts none printed a traceback."""
    script = ("import sys\nfrom phivision.cli.main import main\n"
              f"for argv in {commands!r}:\n    status = main(argv)\n    if status:\n        sys.exit(status)\n")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                               preexec_fn=lambda: os.umask(umask))
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


@pytest.mark.slow
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


def write_lock(folder: Path, host: str, pid: int, created: float | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    holder = {"host": host, "pid": pid, "started": "2026-01-01 00:00:00 UTC"}
    path.write_text(json.dumps(holder if created is None else {**holder, "created": created}))
    return path


@pytest.mark.parametrize("holder", ["dead pid", "pid reused since"])
def test_a_lock_left_by_a_dead_run_on_this_host_is_taken_over(tmp_path, tiny_model_dir, digits_data, holder):
    if holder == "dead pid":
        gone = subprocess.Popen(["true"])
        gone.wait()
        pid, created = gone.pid, None
    else:  # e.g. a restarted container: same host name, the pid now belongs to a newer process (this one)
        pid, created = os.getpid(), 1_000_000_000.0
    write_lock(tmp_path / "run", socket.gethostname(), pid, created)
    completed = phivision("train", str(train_config(tmp_path, tiny_model_dir, digits_data, max_steps=1)))
    assert completed.returncode == 0, completed.stderr
    assert f"taking over the lock of a run that is gone (pid {pid}" in completed.stderr
    assert (tmp_path / "run" / "model").is_dir()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_refused_saying_how_to_remove_it(tmp_path, tiny_model_dir, digits_data, capfd):
    lock = write_lock(tmp_path / "run", "node-elsewhere", 1234)
    config = train_config(tmp_path, tiny_model_dir, digits_data, max_steps=1)
    error = one_line_error(phivision_in_process(capfd, "train", str(config)), "train")
    assert "another machine (pid 1234 on node-elsewhere" in error and f"delete {lock}" in error
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # nothing written


@pytest.mark.slow
def test_under_torchrun_a_refusal_by_rank_0_stops_every_rank(tmp_path, tiny_model_dir, digits_data):
    write_lock(tmp_path / "run", socket.gethostname(), os.getpid())
    config = train_config(tmp_path, tiny_model_dir, digits_data, per_device_batch_size=2, max_steps=2)
    completed = torchrun(tmp_path, config)  # would time out if rank 1 waited for rank 0 forever
    assert completed.returncode != 0
    assert f"is in use by another run (pid {os.getpid()}" in completed.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]


def test_the_lock_is_released_when_training_fails(tmp_path, tiny_model_dir, digits_data, capfd):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"id": "x", "conversations": [{"images": ["missing.png"], "user": "q", "assistant": "a"}]}\n')
    config = train_config(tmp_path, tiny_model_dir, digits_data, train_data=str(data))
    completed = phivision_in_process(capfd, "train", str(config))
    assert "1 invalid sample(s)" in one_line_error(completed, "train")
    assert not (tmp_path / "run" / LOCK_NAME).exists()


# ---- nothing the user made is overwritten ---------------------------------------------------


def test_init_tiny_refuses_a_folder_with_weights_unless_told_to_overwrite(tmp_path, capfd):
    folder = tmp_path / "tiny"
    assert phivision_in_process(capfd, "init-tiny", str(folder)).returncode == 0
    before = fingerprint(folder)
    error = one_line_error(phivision_in_process(capfd, "init-tiny", str(folder), "--seed", "1"), "init-tiny")
    assert "already holds weights (model.safetensors)" in error and "--overwrite" in error
    assert fingerprint(folder) == before
    assert phivision_in_process(capfd, "init-tiny", str(folder), "--seed", "1", "--overwrite").returncode == 0
    assert fingerprint(folder)["model.safetensors"] != before["model.safetensors"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, digits_data):
    """A one-step LoRA run (checkpoint-1 and the adapter in model/) trained by the CLI with umask 022."""
    folder = tmp_path_factory.mktemp("lora")
    config = write_yaml(folder / "c.yaml", base_config(tiny_model_dir, digits_data, folder / "run", method="lora",
                                                       max_steps=1, save_steps=1))
    completed = phivision("train", str(config), umask=0o022)
    assert completed.returncode == 0, completed.stderr
    return folder / "run"


@pytest.mark.parametrize("target", ["non-empty", "base model"])
def test_export_refuses_a_non_empty_folder_before_any_work(tmp_path, tiny_model_dir, lora_run, target, capfd):
    if target == "base model":
        out = Path(tiny_model_dir)
    else:
        out = tmp_path / "out"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = fingerprint(out)
    error = one_line_error(phivision_in_process(capfd, "export", "--run", str(lora_run), "--out", str(out)), "export")
    assert f"--out {out} is not empty" in error and "--overwrite" in error
    assert ("the run's base model" in error) == (target == "base model")
    assert fingerprint(out) == before


# ---- files readable as the umask says -------------------------------------------------------


def modes(folder: Path) -> set[str]:
    return {oct(stat.S_IMODE(path.stat().st_mode)) for path in folder.rglob("*") if path.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("umask, mode", [(0o022, "0o644"), (0o077, "0o600")])
def test_every_written_file_follows_the_umask(tmp_path, tiny_model_dir, digits_data, lora_run, umask, mode):
    tiny, export = tmp_path / "tiny", tmp_path / "export"
    config = train_config(tmp_path, tiny_model_dir, digits_data, max_steps=1, save_steps=1)
    completed = phivision_commands(["init-tiny", str(tiny)], ["train", str(config)],
                                   ["export", "--run", str(lora_run), "--out", str(export), "--precision", "fp32"],
                                   umask=umask)
    assert completed.returncode == 0, completed.stderr
    run = tmp_path / "run"
    for folder in (tiny, run / "model", run / "checkpoint-1", export):
        assert modes(folder) == {mode}, folder
    if umask == 0o022:  # trained under 022 by the fixture
        for folder in (lora_run / "model", lora_run / "checkpoint-1"):
            assert modes(folder) == {mode}, folder


# ---- a broken model folder fails first, in one line -----------------------------------------


def break_folder(folder: Path, fault: str) -> None:
    weights = folder / "model.safetensors"
    if fault == "truncated":
        with weights.open("r+b") as file:
            file.truncate(weights.stat().st_size // 2)
    elif fault == "missing shard":
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        weights.rename(folder / shards[0])
        index = {"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif fault == "bad json":
        (folder / "config.json").write_text('{"model_type": "phi3_v",')
    elif fault == "llama":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    elif fault == "header garbage":
        payload = bytearray(weights.read_bytes())
        payload[8:40] = b"#" * 32
        weights.write_bytes(bytes(payload))


BROKEN = {
    "truncated": "model.safetensors is not a whole safetensors file: its header lists",
    "missing shard": "lacks model-00002-of-00002.safetensors named in model.safetensors.index.json",
    "bad json": "config.json is not valid JSON",
    "llama": "has model_type 'llama': phivision loads Phi-3-V checkpoints ('phi3_v') only",
    "header garbage": "model.safetensors is not a whole safetensors file (its header is not valid)",
}


@pytest.fixture()
def broken_model(request, tmp_path, tiny_model_dir) -> Path:
    import shutil

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    break_folder(folder, request.param)
    return folder


@pytest.mark.parametrize("broken_model", list(BROKEN), indirect=True)
def test_training_on_a_broken_model_folder_fails_before_the_data_check(tmp_path, broken_model, digits_data, request,
                                                                       capfd):
    data = tmp_path / "broken.jsonl"  # the data is broken too: the model must be what's reported
    data.write_text('{"id": "x", "conversations": [{"images": ["missing.png"], "user": "q", "assistant": "a"}]}\n')
    config = write_yaml(tmp_path / "c.yaml", base_config(broken_model, digits_data, tmp_path / "run",
                                                         train_data=str(data)))
    error = one_line_error(phivision_in_process(capfd, "train", str(config)), "train")
    assert BROKEN[request.node.callspec.params["broken_model"]] in error
    assert "missing.png" not in error


@pytest.mark.parametrize("broken_model", ["truncated"], indirect=True)
@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_eval_predict_and_export_check_the_model_folder_first(tmp_path, broken_model, digits_data, command, capfd):
    if command == "eval":
        args = ["eval", "--model", str(broken_model), "--data", str(digits_data / "small_test.jsonl")]
    elif command == "predict":
        args = ["predict", "--model", str(broken_model), "--prompt", "hi", "--image", str(tmp_path / "missing.png")]
    else:
        run = tmp_path / "run"
        run.mkdir()
        write_yaml(run / "config.yaml", {"model": str(broken_model), "method": "lora",
                                         "train_data": str(digits_data / "small_train.jsonl")})
        args = ["export", "--run", str(run), "--out", str(tmp_path / "out")]
    error = one_line_error(phivision_in_process(capfd, *args), command)
    assert BROKEN["truncated"] in error


# ---- configs that would learn nothing, or less than they seem to ----------------------------


def test_a_run_whose_only_step_is_at_learning_rate_zero_is_refused(tmp_path, tiny_model_dir, digits_data, capfd):
    data = tmp_path / "seventeen.jsonl"
    data.write_text("\n".join((digits_data / "small_train.jsonl").read_text().splitlines()[:17]) + "\n")
    config = write_yaml(tmp_path / "c.yaml", {"model": str(tiny_model_dir), "train_data": str(data),
                                              "output_dir": str(tmp_path / "run"),
                                              "train_image_root": str(digits_data / "images")})
    error = one_line_error(phivision_in_process(capfd, "train", str(config)), "train")
    assert "makes 1 optimiser step (17 samples, global_batch_size=64, epochs=1) and warm-up takes it at " \
           "learning rate 0 (warmup_steps=50)" in error
    assert not (tmp_path / "run" / "model").exists()


def test_configs_that_train_less_than_they_seem_get_a_warning_naming_the_fix(tmp_path, tiny_model_dir, digits_data,
                                                                            capfd):
    data = tmp_path / "six.jsonl"
    data.write_text("\n".join((digits_data / "small_train.jsonl").read_text().splitlines()[:6]) + "\n")
    config = train_config(tmp_path, tiny_model_dir, digits_data, train_data=str(data),
                          train_image_root=str(digits_data / "images"), max_steps=2, warmup_steps=5,
                          eval_data=str(digits_data / "small_test.jsonl"), lora_rank=8)
    completed = phivision_in_process(capfd, "train", str(config))
    assert completed.returncode == 0, completed.stderr
    warnings = [line for line in completed.stderr.splitlines() if line.startswith("phivision train: warning: ")]
    assert len(warnings) == 4, completed.stderr
    for fix in ("lower warmup_steps", "lower global_batch_size", "set eval_steps", "lora_rank only applies"):
        assert any(fix in warning for warning in warnings), (fix, warnings)


@pytest.mark.parametrize("overrides, samples, world_size, steps", [
    ({"epochs": 0.5}, 40, 1, 3),  # 5 steps an epoch, half of it rounded up, as the Trainer does
    ({"epochs": 2.0, "per_device_batch_size": 2}, 17, 2, 6),  # 9 micro-batches over 2 ranks: 5 each, 3 steps an epoch
    ({"max_steps": 7, "epochs": 3.0}, 40, 1, 7),  # max_steps wins
])
def test_the_step_count_is_the_trainers(tiny_model_dir, overrides, samples, world_size, steps):
    from phivision.train.config import load_config, optimiser_steps

    values = {"model": str(tiny_model_dir), "train_data": "x.jsonl", "output_dir": "out", "global_batch_size": 8,
              "per_device_batch_size": 1, **overrides}
    assert optimiser_steps(load_config(None, base=values), samples, world_size) == steps


# ---- eval output and pipes ------------------------------------------------------------------


def test_eval_into_an_existing_file_fails_before_generating(tmp_path, tiny_model_dir, digits_data, capfd):
    out = tmp_path / "results.json"
    out.write_text("earlier results")
    completed = phivision_in_process(capfd, "eval", "--model", str(tiny_model_dir), "--data",
                               str(digits_data / "small_test.jsonl"), "--out", str(out))
    assert f"--out {out} is a file" in one_line_error(completed, "eval")
    assert out.read_text() == "earlier results"


def test_validate_into_a_closed_pipe_ends_quietly(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"s{k}", "conversations": [
        {"images": [f"missing-{k}.png"], "user": "q", "assistant": "a"}]}) + "\n" for k in range(3000)))
    command = " ".join(phivision_command("validate", str(data), "--no-decode", "--max-problems", "100000"))
    completed = subprocess.run(f"{command} 2>{tmp_path / 'stderr'} | head -1", shell=True, capture_output=True,
                               text=True, timeout=300)
    assert completed.stdout.count("\n") == 1 and "missing-0.png" in completed.stdout
    assert (tmp_path / "stderr").read_text() == ""
