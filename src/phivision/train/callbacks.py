"""Callbacks on the Trainer's events: the metrics file, the progress bar, a graceful stop."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import TrainerCallback


class MetricsFileCallback(TrainerCallback):
    """Every log line also goes to `metrics.jsonl`, which the report and plots read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as file:
                file.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


class ProgressBarCallback(TrainerCallback):
    """One bar with loss, learning rate, images/s and tokens/s; tqdm supplies the ETA."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        shown = {"loss": "loss", "learning_rate": "lr", "images_per_second": "img/s", "tokens_per_second": "tok/s",
                 "eval_loss": "eval_loss"}
        postfix = {label: f"{logs[key]:.4g}" for key, label in shown.items() if key in logs}
        postfix.update({key: f"{value:.4g}" for key, value in logs.items() if key.startswith("eval_") and
                        key not in shown and isinstance(value, float)})
        if postfix:
            self.bar.set_postfix(postfix, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
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
