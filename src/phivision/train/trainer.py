"""A thin `transformers.Trainer` subclass: atomic checkpoints, a NaN guard, throughput, a fixed order.

Everything else (the loop, gradient accumulation with a token-mean loss over the global batch,
DDP, DeepSpeed, mixed precision, checkpoint contents and resume) is the Trainer's own.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from phivision.data.sampler import EpochShuffleSampler, TokenBudgetBatchSampler
from phivision.errors import PhivisionError
from phivision.train.checkpoints import complete_checkpoints, disk_error, publish, staging_dir


def finite_everywhere(loss: torch.Tensor) -> bool:
    """True when no process's loss is NaN or infinite: every rank stops at the same step, or none does."""
    non_finite = (~torch.isfinite(loss.detach())).any().float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(non_finite)
    return non_finite.item() == 0


class PhivisionTrainer(Trainer):
    def __init__(self, *args, sample_lengths: list[int] | None = None, group_by_length: bool = False,
                 max_tokens_per_batch: int | None = None, **kwargs):
        """`sample_lengths` (tokens per training sample) serve length grouping and token budgets."""
        super().__init__(*args, **kwargs)
        self.sample_lengths = sample_lengths
        self.group_by_length = group_by_length
        self.max_tokens_per_batch = max_tokens_per_batch
        self._staging = False
        self._images = 0
        self._tokens = 0
        self._window_start = time.perf_counter()

    # ---- order ------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        """Order depends on (seed, epoch) only, so a resumed run replays exactly the same batches."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = self.sample_lengths if self.group_by_length else None
        return EpochShuffleSampler(len(dataset), self.args.seed, lengths, self.args.per_device_train_batch_size)

    def get_train_dataloader(self):
        """With a token budget, a micro-batch is as many samples as fit in `max_tokens_per_batch`.

        Every epoch then has the same number of micro-batches, whole optimiser steps on every rank:
        the Trainer plans the run (and places a resumed one) from that number.
        """
        if self.max_tokens_per_batch is None:
            return super().get_train_dataloader()
        args = self.args
        batch_sampler = TokenBudgetBatchSampler(
            self._get_train_sampler(), self.sample_lengths, self.max_tokens_per_batch,
            batch_multiple=args.gradient_accumulation_steps * args.world_size,
            epochs=math.ceil(args.num_train_epochs), max_steps=args.max_steps,
        )
        workers = self.args.dataloader_num_workers
        loader = DataLoader(self.train_dataset, batch_sampler=batch_sampler, collate_fn=self.data_collator,
                            num_workers=workers, pin_memory=self.args.dataloader_pin_memory,
                            persistent_workers=workers > 0)
        return self.accelerator.prepare(loader)

    # ---- steps ------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        if "image_sizes" in inputs:
            self._images += int(inputs["image_sizes"].shape[0])
        self._tokens += int(inputs["input_ids"].numel() if "attention_mask" not in inputs else inputs["attention_mask"].sum())
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not finite_everywhere(loss):
            previous = complete_checkpoints(self.args.output_dir)
            kept = f"the last good checkpoint is {previous[-1]}" if previous else "no checkpoint was saved yet"
            raise PhivisionError(
                f"the loss became non-finite at step {self.state.global_step + 1} (here: {loss.item()}); "
                f"stopped, {kept}. Lower learning_rate, or use bf16/fp32 instead of fp16"
            )
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            world = self.args.world_size
            logs["images_per_second"] = round(self._images * world / elapsed, 3)
            logs["tokens_per_second"] = round(self._tokens * world / elapsed, 1)
            self._images = self._tokens = 0
            self._window_start = time.perf_counter()
        super().log(logs, start_time)

    # ---- checkpoints ------------------------------------------------------------------------

    def _get_output_dir(self, trial) -> str:
        if self._staging:
            return str(staging_dir(self.args.output_dir))
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write into a staging folder, then rename into place once every process is done."""
        name = f"checkpoint-{self.state.global_step}"
        staged = staging_dir(self.args.output_dir) / name
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        except OSError as error:
            if self.args.should_save:
                import shutil

                shutil.rmtree(staged, ignore_errors=True)
            raise disk_error(self.state.global_step, self.args.output_dir, error) from None
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish(staged, Path(self.args.output_dir) / name)
            rotate_checkpoints(
                output_dir=self.args.output_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()
