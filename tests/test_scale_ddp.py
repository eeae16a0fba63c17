"""Several processes at real-job shapes: mixed text/image micro-batches, token budgets, clean exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import (phivision_command, run_on_two_processes, train_run, train_values, wait_for, write_lines,
                     write_yaml)
from safetensors.torch import load_file
from transformers import TrainerCallback

from phivision.cli.main import main
from phivision.data.sampler import EpochShuffleSampler
from phivision.errors import PhivisionError

# ---- leaving the process group -------------------------------------------------------------


def as_rank_of_two(rank: int, port: int) -> None:
    """The environment torchrun gives rank `rank` of two processes."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


EXIT_PATHS = {"success": None, "error": PhivisionError("bad data"), "interrupt": KeyboardInterrupt()}


def _leave_on_rank(rank: int, port: int, results, path: str) -> None:
    import torch.distributed as dist

    from phivision.cli.distributed import process_group_left_on_exit

    as_rank_of_two(rank, port)
    raised = None
    try:
        with process_group_left_on_exit():
            dist.init_process_group("gloo")
            dist.barrier()
            if EXIT_PATHS[path] is not None:
                raise EXIT_PATHS[path]
    except (PhivisionError, KeyboardInterrupt) as error:
        raised = type(error).__name__
    results[rank] = (raised, dist.is_initialized())


@pytest.mark.slow
@pytest.mark.parametrize("path", EXIT_PATHS)
def test_a_command_leaves_its_process_group_on_every_way_out(path):
    """A group left to the interpreter's exit aborted a rank now and then ("terminate called...")."""
    raised = {"success": None, "error": "PhivisionError", "interrupt": "KeyboardInterrupt"}[path]
    results = run_on_two_processes(partial(_leave_on_rank, path=path))
    assert results == {0: (raised, False), 1: (raised, False)}


# ---- text-only micro-batches ---------------------------------------------------------------


class FirstStepGradients(TrainerCallback):
    """Saves every trainable weight's gradient (reduced over ranks) just before the first optimiser step."""

    def __init__(self, path: Path):
        self.path = path

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and args.process_index == 0:
            gradients = {name: weight.grad.clone() for name, weight in model.named_parameters()
                         if weight.requires_grad and weight.grad is not None}
            torch.save(gradients, self.path)


def write_images_then_text(digits: Path, path: Path, seed: int) -> Path:
    """8 samples whose epoch order alternates digit image, text only: with one sample per micro-batch
    on two processes, rank 0 gets every image and rank 1 none."""
    images = [json.loads(line) for line in (digits / "small_train.jsonl").read_text().splitlines()[:4]]
    texts = [{"id": f"text-{i}", "conversations": [{"user": f"Say the digit after {word}.", "assistant": word}]}
             for i, word in enumerate(["one", "two", "three", "four"])]
    order = list(EpochShuffleSampler(8, seed))
    records = [None] * 8
    for position, index in enumerate(order):
        records[index] = images[position // 2] if position % 2 == 0 else texts[position // 2]
    write_lines(path, records)
    return path


def text_only_run(model_dir, digits: Path, data: Path, out: Path, method: str, callbacks: list, **overrides) -> int:
    return train_run(model_dir, digits, out, callbacks=callbacks, method=method, train_data=str(data),
                     train_image_root=str(digits / "images"), global_batch_size=4, per_device_batch_size=1,
                     max_steps=2, max_grad_norm=0.0, lora_dropout=0.0, seed=0, precision="fp32",
                     **overrides).global_step


def _train_on_rank(rank: int, port: int, results, run) -> None:
    """`run()` as one of two torchrun-like ranks; its result in `results[rank]`."""
    from phivision.cli.distributed import process_group_left_on_exit

    torch.set_num_threads(1)
    as_rank_of_two(rank, port)
    with process_group_left_on_exit():
        results[rank] = run()


TEXT_ONLY_METHODS = ["full", "freeze_vision", "projector_only", "lora", "qlora"]


def text_only_runs_of_every_method(model_dir, digits: Path, data: Path, out: Path) -> dict[str, int]:
    """Each method's run in turn, its first gradients in out/METHOD/gradients.pt; steps made per method."""
    return {method: text_only_run(model_dir, digits, data, out / method, method,
                                  [FirstStepGradients(out / method / "gradients.pt")])
            for method in TEXT_ONLY_METHODS}


@pytest.fixture(scope="module")
def text_only_ddp(tmp_path_factory, tiny_model_dir, digits) -> tuple[Path, Path, dict]:
    """One pair of processes trains every method (one launch, not five): the data, the runs, steps per rank."""
    folder = tmp_path_factory.mktemp("text-only")
    data = write_images_then_text(digits, folder / "mixed.jsonl", seed=0)
    run = partial(text_only_runs_of_every_method, tiny_model_dir, digits, data, folder / "ddp")
    return data, folder / "ddp", run_on_two_processes(partial(_train_on_rank, run=run))


@pytest.mark.slow
@pytest.mark.parametrize("method", TEXT_ONLY_METHODS)
def test_a_rank_with_only_text_micro_batches_gets_the_gradients_of_one_process(tmp_path, tiny_model_dir, digits,
                                                                               text_only_ddp, method):
    """Without a vision pass on that rank, DDP reduced wrong gradients, then stopped at step 2."""
    data, ddp, ranks = text_only_ddp
    single = [FirstStepGradients(tmp_path / "single.pt")]
    text_only_run(tiny_model_dir, digits, data, tmp_path / "single", method, single)
    assert {rank: steps[method] for rank, steps in ranks.items()} == {0: 2, 1: 2}, method  # both steps ran
    expected, reduced = torch.load(tmp_path / "single.pt"), torch.load(ddp / method / "gradients.pt")
    assert expected.keys() == reduced.keys(), method
    assert any("vision_embed_tokens" in name for name in expected), method
    for name, gradient in expected.items():
        torch.testing.assert_close(reduced[name], gradient, rtol=1e-4, atol=1e-6, msg=f"{method}: {name}")



@pytest.mark.slow
def test_zero3_trains_with_a_rank_that_has_only_text(tmp_path, tiny_model_dir, digits, monkeypatch):
    """ZeRO-3 gathers each module's weights as it runs: a rank that skipped the vision tower aborted."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    data = write_images_then_text(digits, tmp_path / "mixed.jsonl", seed=0)
    run = partial(text_only_run, tiny_model_dir, digits, data, tmp_path / "run", "full", [], deepspeed="zero3")
    assert run_on_two_processes(partial(_train_on_rank, run=run)) == {0: 2, 1: 2}


def write_image_text_alternating(digits: Path, path: Path) -> Path:
    """Digit image, text only, in file order: one sample per eval batch puts every image on rank 0."""
    images = [json.loads(line) for line in (digits / "small_test.jsonl").read_text().splitlines()[:3]]
    texts = [{"id": f"eval-text-{i}", "conversations": [{"user": f"Say the digit after {word}.", "assistant": word}]}
             for i, word in enumerate(["one", "two", "three"])]
    write_lines(path, [sample for pair in zip(images, texts) for sample in pair])
    return path


def zero3_run_with_task_metric(model_dir, digits: Path, data: Path, out: Path, evaluation: dict) -> int:
    """As `phivision train` runs it, so the task metric is computed at every evaluation."""
    from phivision.cli.train import train_model

    values = train_values(model_dir, digits, out, train_data=str(data), train_image_root=str(digits / "images"),
                          global_batch_size=4, per_device_batch_size=1, max_steps=2, seed=0, precision="fp32",
                          deepspeed="zero3", **evaluation)
    return train_model(values).global_step


@pytest.mark.slow
def test_zero3_evaluates_with_a_rank_that_has_only_text(tmp_path, tiny_model_dir, digits, monkeypatch):
    """The eval loss and the task metric under ZeRO-3: a rank whose eval batches are text only
    skipped the vision tower's weight gathers that the other rank waited in."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    data = write_images_then_text(digits, tmp_path / "mixed.jsonl", seed=0)
    evaluation = {"eval_data": str(write_image_text_alternating(digits, tmp_path / "eval.jsonl")),
                  "eval_image_root": str(digits / "images"), "eval_steps": 2, "eval_samples": 6,
                  "eval_batch_size": 1, "max_new_tokens": 2, "ddp_timeout": 60}
    out = tmp_path / "run"
    run = partial(zero3_run_with_task_metric, tiny_model_dir, digits, data, out, evaluation)
    assert run_on_two_processes(partial(_train_on_rank, run=run)) == {0: 2, 1: 2}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [record for record in records if "eval_loss" in record]
    assert len(evaluated) == 1 and evaluated[0]["step"] == 2
    assert any("eval_accuracy" in record for record in records), records

# ---- token budgets over several epochs -----------------------------------------------------

# Greedy packing of the data below gives 11/10/11 micro-batches in epochs 0/1/2 with this seed.
BUDGET_RUN = {"max_tokens_per_batch": 120, "max_length": 100, "global_batch_size": 2, "per_device_batch_size": 1,
              "max_steps": -1, "epochs": 3, "save_steps": 1000, "logging_steps": 1, "seed": 2}


def write_varied_lengths(digits: Path, path: Path) -> Path:
    """12 digit images (37 tokens each) and 12 text samples of 15 to 90 tokens: packings differ per epoch."""
    images = [json.loads(line) for line in (digits / "small_train.jsonl").read_text().splitlines()[:12]]
    texts = [{"id": f"text-{i}", "conversations": [{"user": " ".join(["digit"] * (3 + 6 * i)), "assistant": "zero"}]}
             for i in range(12)]
    write_lines(path, [sample for pair in zip(images, texts) for sample in pair])
    return path


class MicroBatchesPerStep(TrainerCallback):
    def __init__(self):
        self.counts, self.current = [], 0

    def on_substep_end(self, args, state, control, **kwargs):
        self.current += 1

    def on_step_end(self, args, state, control, **kwargs):
        self.counts.append(self.current + 1)
        self.current = 0


def budget_run(model_dir, digits: Path, data: Path, out: Path, **overrides) -> tuple[int, int, list[int]]:
    """Steps made, steps in the first epoch, and micro-batches per step."""
    counter = MicroBatchesPerStep()
    result = train_run(model_dir, digits, out, callbacks=[counter], train_data=str(data),
                       train_image_root=str(digits / "images"), **{**BUDGET_RUN, **overrides})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result.global_step, sum(1 for r in records if "loss" in r and r["epoch"] <= 1), counter.counts


def test_a_token_budget_run_makes_exactly_its_planned_steps_of_whole_accumulations(tmp_path, tiny_model_dir, digits):
    """Epochs packed into 23/21/20/20 micro-batches: the run fell short of its plan and steps mixed epochs."""
    data = write_varied_lengths(digits, tmp_path / "varied.jsonl")
    steps, first_epoch, micro_batches = budget_run(tiny_model_dir, digits, data, tmp_path / "run")
    assert steps == 3 * first_epoch
    assert micro_batches == [2] * steps


@pytest.mark.slow
def test_a_token_budget_splits_every_epoch_evenly_over_two_processes(tmp_path, tiny_model_dir, digits):
    data = write_varied_lengths(digits, tmp_path / "varied.jsonl")
    run = partial(budget_run, tiny_model_dir, digits, data, tmp_path / "run", global_batch_size=4, epochs=2)
    ranks = run_on_two_processes(partial(_train_on_rank, run=run))
    steps, first_epoch, micro_batches = ranks[0]
    assert ranks[1][0] == steps == 2 * first_epoch
    assert micro_batches == ranks[1][2] == [2] * steps


@pytest.mark.slow
def test_a_token_budget_run_killed_mid_epoch_resumes_bit_identical(tmp_path, tiny_model_dir, digits):
    """Killed in the third epoch, after a shorter second one, the resumed run started at the wrong batch.

    Only the killed run needs its own process; the straight run and the resume run in this one."""
    data = write_varied_lengths(digits, tmp_path / "varied.jsonl")
    values = train_values(tiny_model_dir, digits, tmp_path / "straight", train_data=str(data),
                          train_image_root=str(digits / "images"), learning_rate=3e-3,
                          **{**BUDGET_RUN, "save_steps": 7, "save_total_limit": None})
    assert main(["train", str(write_yaml(tmp_path / "straight.yaml", values))]) == 0
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    in_epoch_3 = [r["step"] for r in records if "loss" in r and 2 < r["epoch"] < 3 and r["step"] % 7 == 0]
    assert in_epoch_3, "no checkpoint falls inside the third epoch"
    killed = write_yaml(tmp_path / "killed.yaml", {**values, "output_dir": str(tmp_path / "killed")})
    process = subprocess.Popen(phivision_command("train", str(killed)), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    wait_for(tmp_path / "killed" / f"checkpoint-{in_epoch_3[0]}", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "model").exists()
    assert main(["train", str(killed), "--resume", "auto"]) == 0
    first, second = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("straight", "killed"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
