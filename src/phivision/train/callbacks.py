"""Callbacks on the Trainer's events: the metrics file, the progress bar, a graceful stop."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import TrainerCallback

from phivision.train.report import eval_results


class MetricsFileCallback(TrainerCallback):
    """Every log line also goes to `metrics.jsonl`, which the report and plots read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as file:
                file.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class ProgressBarCallback(TrainerCallback):
    """The training bar keeps loss, lr, images/s and tokens/s (tqdm adds the ETA); each evaluation
    gets a bar of its own while it runs and leaves one line with its results above the training bar."""

    TRAINING = {"loss": "loss", "learning_rate": "lr", "images_per_second": "img/s", "tokens_per_second": "tok/s"}

    def __init__(self):
        self.bar = None
        self.eval_bar = None
        self.results: dict[str, float] = {}
        self.results_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self._print_results()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.bar is None:
            return
        if self.eval_bar is None:
            total = len(eval_dataloader) if eval_dataloader is not None and hasattr(eval_dataloader, "__len__") else None
            self.eval_bar = tqdm(total=total, desc="eval loss", leave=False, dynamic_ncols=True)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        postfix = {label: f"{logs[key]:.4g}" for key, label in self.TRAINING.items() if key in logs}
        if postfix:
            self.bar.set_postfix(postfix, refresh=True)
        results = eval_results(logs)
        if results:
            if state.global_step != self.results_step:
                self._print_results()
            self.results.update(results)
            self.results_step = state.global_step

    def _print_results(self) -> None:
        """One line per evaluation: the eval loss and the task metric arrive in separate log calls."""
        if self.bar is not None and self.results:
            shown = ", ".join(f"{key.removeprefix('eval_')} {value:.4f}" for key, value in self.results.items())
            self.bar.write(f"step {self.results_step}: eval {shown}")
        self.results = {}

    def on_train_end(self, args, state, control, **kwargs):
        self._print_results()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class GracefulInterruptCallback(TrainerCallback):
    """Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and stops.

    SIGTERM is what SLURM, Kubernetes and torchrun send before they kill. A second Ctrl-C aborts at
    once; a repeated SIGTERM (a scheduler and the launcher both forward it) changes nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_number: int | None = None
        self.previous = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT and self.signal_number == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signal_number = signum
        name = signal.Signals(signum).name
        again = " (Ctrl-C again to abort)" if signum == signal.SIGINT else ""
        print(f"\n{name}: finishing this step, saving a checkpoint, then stopping{again}", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        for number in self.SIGNALS:
            try:
                self.previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread
                pass

    def on_step_end(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([float(self.signal_number or 0)])
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
            self.signal_number = int(flag.item()) or None
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for number, previous in self.previous.items():
            signal.signal(number, previous)
        self.previous = {}
