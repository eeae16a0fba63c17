"""Training runs never lose work, and never silently do something other than the config says.

Each fault is met as a user meets it: `phivision train` (in a subprocess where signals reach it,
else in this process, which saves a fresh interpreter's imports), real signals, a full or read-only
disk (a small tmpfs when this machine lets us mount one, else an injected error), then the exit
status, the output and what is on disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import base_config, phivision_command, phivision_in_process, torchrun_command, wait_for, write_yaml
from safetensors.torch import load_file

from phivision.errors import PhivisionError
from phivision.train.checkpoints import clear_staging, missing_parts, publish, staging_dir
from phivision.train.config import load_config
from phivision.train.run import run_training


def train_cli(capfd, config: Path, *args: str) -> subprocess.CompletedProcess:
    """`phivision train CONFIG ARGS` in this process (see `phivision_in_process`)."""
    return phivision_in_process(capfd, "train", str(config), *args)


def train_process(config: Path, *args: str) -> subprocess.CompletedProcess:
    """`phivision train CONFIG ARGS` in a subprocess; asserts it printed no traceback."""
    completed = subprocess.run(phivision_command("train", str(config), *args), capture_output=True, text=True,
                               timeout=600)
    assert "Traceback" not in completed.stdout + completed.stderr, completed.stderr[-3000:]
    return completed


def first_run(tmp_path: Path, model_dir, data, **overrides) -> Path:
    """A finished short run (linear schedule; in this process, to save time) and its config file."""
    values = base_config(model_dir, data, tmp_path / "run", **{"max_steps": 3, "save_steps": 3,
                                                               "lr_scheduler": "linear", **overrides})
    run_training(load_config(None, base=values))
    return write_yaml(tmp_path / "c.yaml", values)


def logged(out: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r}


def error_line(completed: subprocess.CompletedProcess) -> str:
    lines = [line for line in completed.stderr.splitlines() if "error:" in line]
    assert completed.returncode == 2 and len(lines) == 1, completed.stderr[-3000:]
    return lines[0]


# ---- resume continues the same run ---------------------------------------------------------


def test_resume_under_another_config_is_refused_before_anything_is_rewritten(tmp_path, tiny_model_dir, digits, capfd):
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    config = first_run(tmp_path, tiny_model_dir, data)
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.jsonl")}
    changed = train_cli(capfd, config, "--set", "learning_rate=0.01", "--set", "method=lora", "--set",
                        "per_device_batch_size=4", "--set", "max_steps=6", "--resume", "auto")
    line = error_line(changed)
    for difference in ("learning_rate 0.003 -> 0.01", "method 'full' -> 'lora'", "per_device_batch_size 8 -> 4"):
        assert difference in line
    assert "max_steps 3" not in line  # lengthening a run is allowed
    lines = (data / "small_train.jsonl").read_text().splitlines()
    (data / "small_train.jsonl").write_text("\n".join(lines[1:]) + "\n")
    assert "train_data_sha256" in error_line(train_cli(capfd, config, "--set", "max_steps=6", "--resume", "auto"))
    assert {name: (run / name).read_bytes() for name in before} == before
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-3"]


def test_a_finished_run_is_left_alone_and_a_longer_one_follows_the_new_schedule(tmp_path, tiny_model_dir, digits,
                                                                                capfd):
    config = first_run(tmp_path, tiny_model_dir, digits)
    run = tmp_path / "run"
    weights = (run / "model" / "model.safetensors").read_bytes()
    again = train_cli(capfd, config, "--resume", "auto")  # a job script rerun
    assert again.returncode == 0 and "already finished: 3 steps" in again.stdout, again.stdout + again.stderr[-2000:]
    assert (run / "model" / "model.safetensors").read_bytes() == weights
    assert max(logged(run, "loss")) == 3 and not (run / "checkpoint-4").exists()
    shutil.rmtree(run / "model")  # killed while writing model/ after its last checkpoint
    rewritten = run_training(load_config(config), resume="auto")
    assert rewritten.global_step == 3 and max(logged(run, "loss")) == 3
    assert (run / "model" / "model.safetensors").read_bytes() == weights

    longer = train_cli(capfd, config, "--set", "max_steps=6", "--resume", "auto")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert f"resuming from {run / 'checkpoint-3'} (step 3)" in longer.stdout
    rates = logged(run, "learning_rate")
    assert sorted(rates) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # linear decay over 6 steps, as a 6-step run from the start would have it
        assert rates[step] == pytest.approx(3e-3 * (6 - (step - 1)) / 6, rel=1e-6), rates


def test_an_incomplete_checkpoint_is_never_used_silently(tmp_path, tiny_model_dir, digits, capfd):
    config = first_run(tmp_path, tiny_model_dir, digits, max_steps=6, save_total_limit=None)
    run = tmp_path / "run"
    (run / "checkpoint-6" / "optimizer.pt").unlink()
    explicit = train_cli(capfd, config, "--resume", str(run / "checkpoint-6"))
    assert "checkpoint is incomplete, optimizer.pt missing" in error_line(explicit)
    (run / "checkpoint-3" / "rng_state.pth").rename(run / "rng_state.pth")
    with pytest.raises(PhivisionError, match="checkpoint is incomplete, rng_state.pth missing"):
        run_training(load_config(config), resume=str(run / "checkpoint-3"))
    (run / "rng_state.pth").rename(run / "checkpoint-3" / "rng_state.pth")
    shutil.rmtree(run / "model")
    auto = train_cli(capfd, config, "--resume", "auto")
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "checkpoint-6 is incomplete (optimizer.pt missing): not used" in auto.stdout
    assert "(step 3)" in auto.stdout and (run / "model" / "model.safetensors").is_file()


# ---- NaN guard -----------------------------------------------------------------------------


def poisoned_run(tmp_path, model_dir, data, poison, **overrides) -> str:
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            poison(state.global_step, model)

    values = base_config(model_dir, data, tmp_path / "run", **{"save_steps": 3, **overrides})
    with pytest.raises(PhivisionError) as raised:
        run_training(load_config(None, base=values), callbacks=[Poison()])
    return str(raised.value)


def nan_weights_after(step: int):
    def poison(global_step, model):
        if global_step == step:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))
    return poison


def test_non_finite_loss_names_a_checkpoint_that_really_is_good(tmp_path, tiny_model_dir, digits):
    message = poisoned_run(tmp_path, tiny_model_dir, digits, nan_weights_after(4))
    assert "loss became non-finite at step 5 (here: nan)" in message
    assert f"the last good checkpoint is {tmp_path / 'run' / 'checkpoint-3'}" in message
    assert "fp16" not in message  # an fp32 run: the precision is not the suspect
    weights = load_file(tmp_path / "run" / "checkpoint-3" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_non_finite_weights_are_never_published(tmp_path, tiny_model_dir, digits):
    message = poisoned_run(tmp_path, tiny_model_dir, digits, nan_weights_after(3))
    assert "weights became non-finite by step 3, checkpoint-3 was not saved" in message
    assert "no good checkpoint was saved yet" in message
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_non_finite_gradient_norm_stops_before_the_weights_change(tmp_path, tiny_model_dir, digits):
    def infinite_gradient(global_step, model):
        if global_step == 1:  # the backward of step 2 makes one gradient infinite; its loss stays finite
            model.model.norm.weight.register_hook(lambda grad: grad * float("inf"))

    message = poisoned_run(tmp_path, tiny_model_dir, digits, infinite_gradient, save_steps=1)
    assert "gradient norm became non-finite at step 2" in message
    assert f"the last good checkpoint is {tmp_path / 'run' / 'checkpoint-1'}" in message
    assert sorted(path.name for path in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]


# ---- preemption ----------------------------------------------------------------------------


def test_sigterm_finishes_the_step_saves_and_exits_143(tmp_path, tiny_model_dir, digits):
    values = base_config(tiny_model_dir, digits, tmp_path / "run", max_steps=400, save_steps=1000)
    process = subprocess.Popen(phivision_command("train", str(write_yaml(tmp_path / "c.yaml", values))),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(tmp_path / "run" / "metrics.jsonl", process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    assert "SIGTERM: finishing this step" in output and "--resume auto" in output and "Traceback" not in output
    checkpoints = list((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and missing_parts(checkpoints[0], 1) == []
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_one_checkpoint_that_resumes(tmp_path, tiny_model_dir, digits):
    values = base_config(tiny_model_dir, digits, tmp_path / "run", per_device_batch_size=2, max_steps=400,
                         save_steps=1000)
    config = write_yaml(tmp_path / "c.yaml", values)
    command, env = torchrun_command(config)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    wait_for(tmp_path / "run" / "metrics.jsonl", process, timeout=300)
    signalled = time.perf_counter()
    process.send_signal(signal.SIGTERM)  # to the launcher only, as Kubernetes does; it forwards it
    output, _ = process.communicate(timeout=300)
    print(f"SIGTERM to exit: {time.perf_counter() - signalled:.1f} s (torchrun's grace: 30 s)")
    assert process.returncode != 0 and output.count("stopped at step") == 1, output[-3000:]
    assert "src/phivision" not in output, output[-3000:]  # no traceback through our code (torchrun prints its own)
    checkpoints = list((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and missing_parts(checkpoints[0], 2) == [], output[-3000:]
    step = int(checkpoints[0].name.split("-")[1])
    command, env = torchrun_command(config, 2, "--set", f"max_steps={step + 1}", "--resume", "auto")
    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"(step {step})" in resumed.stdout and (tmp_path / "run" / "model" / "model.safetensors").is_file()


# ---- disk errors during a save -------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(folder: Path, size_mb: int, read_only: bool = False):
    """A small filesystem at `folder`, where this machine allows mounting one (root in a permissive container)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size_mb}m" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the injected faults cover it")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, tiny_model_dir, digits, capfd):
    """A tiny checkpoint is 51 MB: 80 MB hold checkpoint-3 but not the staged checkpoint-6 beside it."""
    with tmpfs(tmp_path / "disk", 80) as disk:
        values = base_config(tiny_model_dir, digits, disk / "run", save_total_limit=1)
        completed = train_cli(capfd, write_yaml(tmp_path / "c.yaml", values))
        line = error_line(completed)
        assert f"saving checkpoint-6 into {disk / 'run'} failed" in line and "No space left on device" in line
        assert f"the previous checkpoint {disk / 'run' / 'checkpoint-3'} is intact" in line
        assert sorted(path.name for path in (disk / "run").glob("checkpoint-*")) == ["checkpoint-3"]
        assert missing_parts(disk / "run" / "checkpoint-3", 1) == []
        assert not any(staging_dir(disk / "run").iterdir())


def test_a_read_only_folder_during_a_save_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, digits):
    config = first_run(tmp_path, tiny_model_dir, digits)
    run = tmp_path / "run"
    kept = {path.name: path.read_bytes() for path in (run / "checkpoint-3").iterdir()}
    with tmpfs(staging_dir(run), 1, read_only=True):  # where every checkpoint is written first
        completed = train_process(config, "--set", "max_steps=6", "--resume", "auto")
    line = error_line(completed)
    assert f"saving checkpoint-6 into {run} failed (Read-only file system)" in line
    assert {path.name: path.read_bytes() for path in (run / "checkpoint-3").iterdir()} == kept
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-3"]


@pytest.mark.parametrize("fault", ["EROFS", "torch"])
def test_injected_write_failures_are_one_line(tmp_path, tiny_model_dir, digits, monkeypatch, fault):
    """Where no tmpfs can be mounted: the errors a full or read-only disk raises, injected mid-save."""
    from phivision.train.trainer import PhivisionTrainer

    original = PhivisionTrainer._save_optimizer_and_scheduler
    raised = {"EROFS": OSError(errno.EROFS, "Read-only file system"),
              "torch": RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 0: "
                                    "PytorchStreamWriter failed writing file data/0: file write failed")}[fault]

    def failing(self, output_dir):
        if self.state.global_step == 6:
            raise raised
        original(self, output_dir)

    monkeypatch.setattr(PhivisionTrainer, "_save_optimizer_and_scheduler", failing)
    values = base_config(tiny_model_dir, digits, tmp_path / "run")
    with pytest.raises(PhivisionError, match=r"saving checkpoint-6 into .*run failed \(.+\); nothing of it was kept "
                                             r"and the previous checkpoint .*checkpoint-3 is intact"):
        run_training(load_config(None, base=values))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-3"]
    assert not any(staging_dir(tmp_path / "run").glob("*"))


def test_replacing_a_checkpoint_never_leaves_neither_copy(tmp_path, monkeypatch):
    final = tmp_path / "checkpoint-6"
    final.mkdir()
    (final / "trainer_state.json").write_text("old")
    staged = staging_dir(tmp_path) / "checkpoint-6"
    staged.mkdir(parents=True)
    (staged / "trainer_state.json").write_text("new")
    original = Path.rename

    def killed_before_the_new_copy_lands(self, target):
        if self == staged:
            raise KeyboardInterrupt  # the process dies between the two renames
        return original(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_new_copy_lands)
    with pytest.raises(KeyboardInterrupt):
        publish(staged, final)
    monkeypatch.setattr(Path, "rename", original)
    clear_staging(tmp_path)  # what the next start does
    assert (final / "trainer_state.json").read_text() == "old"
    staged.mkdir(parents=True)
    (staged / "trainer_state.json").write_text("new")
    publish(staged, final)
    assert (final / "trainer_state.json").read_text() == "new" and not any(staging_dir(tmp_path).iterdir())
