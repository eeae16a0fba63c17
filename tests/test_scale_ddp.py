"""Several processes at real-job shapes: mixed text/image micro-batches, token budgets, clean exits."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import run_on_two_processes, train_run, write_lines
from transformers import TrainerCallback

from phivision.data.sampler import EpochShuffleSampler
from phivision.errors import PhivisionError

# ---- leaving the process group -------------------------------------------------------------

EXIT_PATHS = {"success": None, "error": PhivisionError("bad data"), "interrupt": KeyboardInterrupt()}


def _leave_on_rank(rank: int, port: int, results, path: str) -> None:
    import torch.distributed as dist

    from phivision.cli.distributed import process_group_left_on_exit

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
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


def text_only_run(model_dir, digits: Path, data: Path, out: Path, method: str, callbacks: list) -> None:
    train_run(model_dir, digits, out, callbacks=callbacks, method=method, train_data=str(data),
              train_image_root=str(digits / "images"), global_batch_size=4, per_device_batch_size=1,
              max_steps=2, max_grad_norm=0.0, lora_dropout=0.0, seed=0, precision="fp32")


def _train_on_rank(rank: int, port: int, results, model_dir, digits, data, out, method) -> None:
    from phivision.cli.distributed import process_group_left_on_exit

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    with process_group_left_on_exit():
        text_only_run(model_dir, digits, data, out, method, [FirstStepGradients(out / "gradients.pt")])
    results[rank] = "done"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "freeze_vision", "projector_only", "lora", "qlora"])
def test_a_rank_with_only_text_micro_batches_gets_the_gradients_of_one_process(tmp_path, tiny_model_dir, digits,
                                                                               method):
    """Without a vision pass on that rank, DDP reduced wrong gradients, then stopped at step 2."""
    data = write_images_then_text(digits, tmp_path / "mixed.jsonl", seed=0)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    text_only_run(tiny_model_dir, digits, data, single, method, [FirstStepGradients(tmp_path / "single.pt")])
    ranks = run_on_two_processes(partial(_train_on_rank, model_dir=tiny_model_dir, digits=digits, data=data,
                                         out=ddp, method=method))
    assert ranks == {0: "done", 1: "done"}  # both steps ran
    expected, reduced = torch.load(tmp_path / "single.pt"), torch.load(ddp / "gradients.pt")
    assert expected.keys() == reduced.keys()
    assert any("vision_embed_tokens" in name for name in expected)
    for name, gradient in expected.items():
        torch.testing.assert_close(reduced[name], gradient, rtol=1e-4, atol=1e-6, msg=name)

