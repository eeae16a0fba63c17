"""A thin `transformers.Trainer` subclass: atomic checkpoints, a NaN guard, throughput, a fixed order.

Everything else (the loop, gradient accumulation with a token-mean loss over the global batch,
DDP, DeepSpeed, mixed precision, checkpoint contents and resume) is the Trainer's own.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints

from phivision.data.sampler import EpochShuffleSampler, TokenBudgetBatchSampler
from phivision.errors import PhivisionError
from phivision.model.modeling import supervised_positions
from phivision.model.weights import share_like_umask
from phivision.train.checkpoints import complete_checkpoints, disk_error, publish, staging_dir, write_failure
from phivision.train.resume import RUN_RECORD


def finite_everywhere(values: torch.Tensor) -> bool:
    """True when no process's values are NaN or infinite: every rank stops at the same step, or none does."""
    non_finite = (~torch.isfinite(values.detach())).any().float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(non_finite)
    return non_finite.item() == 0


def sample_of_each_token(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Per token, the index of its sample in the batch, and the number of samples.

    A padded batch has one sample per row; a packed row (position ids, restarting at 0) several.
    """
    rows, length = inputs["input_ids"].shape
    if "position_ids" in inputs:
        starts = inputs["position_ids"] == 0
        return (starts.flatten().cumsum(0) - 1).view(rows, length), int(starts.sum())
    return torch.arange(rows, device=inputs["input_ids"].device)[:, None].expand(rows, length), rows


class PhivisionTrainer(Trainer):
    # [loss sum, supervised tokens] of the evaluation in progress, over every process (None outside one).
    _eval_totals: torch.Tensor | None = None

    def __init__(self, *args, sample_lengths: list[int] | None = None, group_by_length: bool = False,
                 max_tokens_per_batch: int | None = None, run_record: str | None = None, **kwargs):
        """`sample_lengths` (tokens per training sample) serve length grouping and token budgets;
        `run_record` (the resolved config) is written into every checkpoint."""
        super().__init__(*args, **kwargs)
        self.run_record = run_record
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
            raise self._non_finite(f"the loss became non-finite at step {self.state.global_step + 1} "
                                   f"(here: {loss.item()})")
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """A non-finite gradient norm stops the run before the optimizer writes it into the weights.

        Under fp16 the loss scaler skips such a step and lowers its scale: that is its normal work.
        """
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if grad_norm is not None and not self.args.fp16:
            norm = torch.as_tensor(grad_norm, dtype=torch.float32).to(self.args.device)
            if not finite_everywhere(norm):
                raise self._non_finite(f"the gradient norm became non-finite at step {self.state.global_step + 1} "
                                       f"(here: {norm.item()})")
        return grad_norm

    def _non_finite(self, what: str) -> PhivisionError:
        previous = complete_checkpoints(self.args.output_dir)
        kept = f"the last good checkpoint is {previous[-1]}" if previous else "no good checkpoint was saved yet"
        hint = "Lower learning_rate, or use bf16/fp32 instead of fp16" if self.args.fp16 else "Lower learning_rate"
        return PhivisionError(f"{what}; stopped, {kept}. {hint}")

    def _weights_finite(self, model) -> bool:
        trainable = [p.detach() for p in model.parameters() if p.requires_grad and p.numel()]
        finite = all(bool(torch.isfinite(p).all()) for p in trainable)
        return finite_everywhere(torch.tensor(0.0 if finite else float("nan"), device=self.args.device))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            world = self.args.world_size
            logs["images_per_second"] = round(self._images * world / elapsed, 3)
            logs["tokens_per_second"] = round(self._tokens * world / elapsed, 1)
            self._images = self._tokens = 0
            self._window_start = time.perf_counter()
        super().log(logs, start_time)

    # ---- evaluation -------------------------------------------------------------------------

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """`<prefix>_loss` is the token mean over the whole eval set, like the training loss.

        (The Trainer's own is a mean of per-batch means, so a batch of short answers counts as
        much as one of long answers.)
        """
        self._eval_totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            loss_sum, tokens = self._eval_totals.tolist()
        finally:
            self._eval_totals = None
        if tokens:
            output.metrics[f"{metric_key_prefix}_loss"] = loss_sum / tokens
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """For the loss only: logits only where a label is set, sums per sample gathered over processes.

        Without this, an eval forward computes the full vocabulary at every position (about 0.5 GB
        for one 2.5k-token sample). Per-sample sums go through `gather_for_metrics`, which drops
        the samples repeated to give every process equally many batches.
        """
        if not prediction_loss_only or inputs.get("labels") is None or self._eval_totals is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")
        keep, targets = supervised_positions(labels)
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
            token_losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        sample, num_samples = sample_of_each_token(inputs)
        contributions = torch.stack([token_losses.double(), torch.ones_like(token_losses, dtype=torch.float64)], 1)
        per_sample = torch.zeros(num_samples, 2, dtype=torch.float64, device=contributions.device)
        per_sample.index_add_(0, sample[keep], contributions)
        self._eval_totals += self.accelerator.gather_for_metrics(per_sample).sum(0)
        loss = token_losses.sum() / max(token_losses.numel(), 1)
        return loss.detach(), None, None

    # ---- checkpoints ------------------------------------------------------------------------

    def _get_output_dir(self, trial) -> str:
        if self._staging:
            return str(staging_dir(self.args.output_dir))
        return super()._get_output_dir(trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints and adapters are readable by whoever may read the folder (see share_like_umask)."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            share_like_umask(output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """Write into a staging folder, then rename into place once every process is done.

        Weights that are no longer finite are never published: the last published checkpoint stays
        the last good one.
        """
        if not self._weights_finite(model):
            raise self._non_finite(f"the weights became non-finite by step {self.state.global_step}, "
                                   f"checkpoint-{self.state.global_step} was not saved")
        name = f"checkpoint-{self.state.global_step}"
        staged = staging_dir(self.args.output_dir) / name
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save and self.run_record is not None:
                (staged / RUN_RECORD).write_text(self.run_record)
        except Exception as error:
            reason = write_failure(error, self.args.output_dir)
            if reason is None:
                raise
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
            raise disk_error(self.state.global_step, self.args.output_dir, reason) from None
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

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """A run resumed with a new length follows the schedule for that length from its first step.

        The optimizer's saved learning rate is the old schedule's value (0 at the end of a linear one).
        """
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = self.lr_scheduler
        if checkpoint is None or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates
