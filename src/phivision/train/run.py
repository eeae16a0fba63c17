"""`run_training(config)`: datasets, model, Trainer, checkpoints and the final output folder.

Output folder layout:
    config.yaml          the resolved configuration
    metrics.jsonl        every log line (loss, lr, img/s, tokens/s, eval metrics)
    checkpoint-N/        complete checkpoints (weights or adapter, optimiser, scheduler, RNG, data position)
    model/               the result: a full checkpoint in the official layout, or a LoRA adapter
                         whose adapter_config.json points to the base; processor files either way
    report.md, loss.png  a summary and the curves
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from phivision.data.collate import Collator
from phivision.data.dataset import CheckedData, ConversationDataset, check_dataset, measure_samples
from phivision.errors import PhivisionError
from phivision.model.weights import check_model_folder
from phivision.processing.folder import complete_model_folder, save_model_folder
from phivision.processing.processor import Phi3VProcessor
from phivision.train.checkpoints import (
    check_fresh_output,
    checkpoint_step,
    clear_staging,
    publish,
    resolve_resume,
    staging_dir,
    truncate_metrics,
    write_failure,
)
from phivision.train.config import TrainConfig, check_schedule
from phivision.train.lock import holds_output_lock
from phivision.train.resume import check_same_run, finished, mark_model_step, model_is_at, record_text, run_record
from phivision.train.methods import compute_dtype, load_for_training, trainable_summary
from phivision.train.report import write_model_card, write_report
from phivision.train.callbacks import GracefulInterruptCallback, MetricsFileCallback, ProgressBarCallback
from phivision.train.trainer import PhivisionTrainer

if TYPE_CHECKING:
    from transformers import TrainingArguments

DEEPSPEED_PRESETS = ("zero2", "zero3")

T = TypeVar("T")


@dataclass
class TrainResult:
    """What a run left: the trained model, its folders, the last step, and whether Ctrl-C stopped it."""

    model: object
    output_dir: Path
    model_dir: Path | None
    global_step: int
    interrupted: bool
    skipped_samples: int
    stop_signal: int | None = None  # the signal an interrupted run stopped on
    already_finished: bool = False  # resumed from a checkpoint at the end of the run: nothing trained


def deepspeed_config_path(name: str | None) -> str | None:
    """`zero2` / `zero3` are shipped configs (official ZeRO-2 settings); anything else is a path."""
    if not name:
        return None
    if name in DEEPSPEED_PRESETS:
        return str(resources.files("phivision") / "train" / "deepspeed" / f"{name}.json")
    if not Path(name).is_file():
        raise PhivisionError(f"deepspeed: {name!r} is neither zero2, zero3 nor an existing json file")
    return name


def single_process_rendezvous() -> None:
    """DeepSpeed always wants a process group; without torchrun, describe a group of one."""
    import socket

    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def join_process_group(timeout_s: int) -> None:
    """The group the Trainer's accelerator finds and keeps, with `ddp_timeout` instead of NCCL's 10 minutes."""
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        return
    check_elastic_launch()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=timeout_s))


def check_elastic_launch() -> None:
    """Restarted processes that share torchrun's own store find the killed ones' addresses there (torch 2.x:
    the static rendezvous keeps one store; c10d shares it unless told not to) and wait for them until the timeout."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise PhivisionError(
            f"torchrun --max-restarts={restarts} needs --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT and "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment; otherwise a restart hangs until "
            "ddp_timeout (see README, Several nodes)"
        )


def in_parts(work: Callable[[int, int], list[T]], timeout_s: int) -> list[T]:
    """`work(part, parts)` on every rank for its share; every rank gets all shares joined in rank order.

    N ranks check the data N times faster than one, and each gets the result one process would.
    If a rank dies, torchrun stops the waiting ranks.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return work(0, 1)
    import torch.distributed as dist

    join_process_group(timeout_s)
    shares: list = [None] * world_size
    dist.all_gather_object(shares, work(dist.get_rank(), world_size))
    return [item for share in shares for item in share]


def checked_data(config: TrainConfig, processor: Phi3VProcessor, path: str, image_root: str | None) -> CheckedData:
    measured = in_parts(lambda part, parts: measure_samples(path, processor, image_root, config.max_length,
                                                            config.train_on, part, parts), config.ddp_timeout)
    return check_dataset(path, processor, image_root, config.max_length, config.skip_invalid, config.skip_too_long,
                         config.train_on, measured)


def check_reporters(report_to: list[str]) -> None:
    """A logger that is unknown or not installed is one line before training, not a traceback at its first step."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    available = get_available_reporting_integrations()
    for name in report_to:
        if name not in INTEGRATION_TO_CALLBACK:
            raise PhivisionError(f"report_to: unknown logger {name!r}; choose from {', '.join(INTEGRATION_TO_CALLBACK)}")
        if name not in available:
            raise PhivisionError(f"report_to: {name} is not installed here: pip install {name} (or drop it from report_to)")


def training_arguments(config: TrainConfig, world_size: int) -> TrainingArguments:
    from transformers import TrainingArguments

    dtype = compute_dtype(config)
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation(world_size),
        learning_rate=config.resolved_learning_rate,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_epsilon=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if config.eval_steps else "no",
        eval_steps=config.eval_steps,
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        activation_checkpointing=config.resolved_gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=deepspeed_config_path(config.deepspeed),
        dataloader_num_workers=config.resolved_dataloader_workers,
        dataloader_persistent_workers=config.resolved_dataloader_workers > 0,
        report_to=config.report_to or "none",
        remove_unused_columns=False,
        # The Trainer writes this into the model's config, so into the saved config.json: False (its
        # default) would differ from the base's. Training passes never build a cache (see the model's forward).
        use_cache=True,
        ddp_find_unused_parameters=False,
        ddp_timeout=config.ddp_timeout,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )


@holds_output_lock
def run_training(config: TrainConfig, resume: str | None = None, callbacks: list | None = None) -> TrainResult:
    """Train from a checked config: data checks, model, Trainer, checkpoints and `output_dir/model`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    output_dir = Path(config.output_dir)
    check_model_folder(config.model)  # a broken folder is one line before any work or write
    check_reporters(config.report_to)
    if config.deepspeed:
        single_process_rendezvous()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config.gradient_accumulation(world_size)
    checkpoint, passed_over = resolve_resume(resume, output_dir, world_size)
    record = run_record(config, world_size)
    if checkpoint is not None:  # checked before anything in output_dir is rewritten
        recorded = check_same_run(checkpoint, record)
        step = checkpoint_step(checkpoint)
        if finished(checkpoint, config) and model_is_at(output_dir, step):
            return TrainResult(None, output_dir, output_dir / "model", step, False, 0, already_finished=True)
        if is_main_process():
            for skipped in passed_over:
                print(f"phivision train: {skipped}: not used")
            if not recorded:
                print(f"phivision train: {checkpoint} has no record of its config (saved by an older phivision): "
                      "it cannot be checked against this one")
            print(f"phivision train: resuming from {checkpoint} (step {step})")
    if is_main_process():
        if checkpoint is None:
            check_fresh_output(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        clear_staging(output_dir)
        truncate_metrics(output_dir / "metrics.jsonl", checkpoint_step(checkpoint) if checkpoint else 0)
        (output_dir / "config.yaml").write_text(config.to_yaml())
    processor = Phi3VProcessor.from_pretrained(config.model, num_crops=config.num_crops)
    checked = checked_data(config, processor, config.train_data, config.train_image_root)
    train_set = ConversationDataset(
        config.train_data, processor, config.train_image_root, config.train_on, checked.indices, checked.lengths
    )
    warnings = check_schedule(config, len(train_set), world_size)
    for warning in warnings if is_main_process() else []:
        print(f"phivision train: warning: {warning}", file=sys.stderr)
    eval_set = None
    if config.eval_data and config.eval_steps:
        eval_checked = checked_data(config, processor, config.eval_data, config.eval_image_root)
        limit = config.eval_samples or len(eval_checked.indices)
        eval_set = ConversationDataset(config.eval_data, processor, config.eval_image_root, config.train_on,
                                       eval_checked.indices[:limit], eval_checked.lengths[:limit])
    model = load_for_training(config)
    if is_main_process():
        print(f"phivision train: {config.method}, {trainable_summary(model)}, {len(train_set)} samples"
              + (f" ({checked.skipped} skipped: {checked.skip_reasons})" if checked.skipped else ""))
    interrupt = GracefulInterruptCallback()
    trainer = PhivisionTrainer(
        model=model,
        args=training_arguments(config, world_size),
        data_collator=Collator(processor.tokenizer.pad_id, processor.crop_size, packing=config.packing),
        train_dataset=train_set,
        eval_dataset=eval_set,
        callbacks=[MetricsFileCallback(output_dir / "metrics.jsonl"), ProgressBarCallback(), interrupt,
                   *(callbacks or [])],
        sample_lengths=checked.lengths,
        group_by_length=config.group_by_length,
        max_tokens_per_batch=config.max_tokens_per_batch,
        run_record=record_text(record),
    )
    for callback in callbacks or []:
        if hasattr(callback, "attach"):
            callback.attach(trainer)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if checkpoint is not None and finished(checkpoint, config):  # ended before its model/ was written
        if trainer.is_deepspeed_enabled:
            raise PhivisionError(f"{checkpoint} is the end of the run but {output_dir} has no model/, and under "
                                 f"DeepSpeed it is not rebuilt from a checkpoint: the weights are in {checkpoint}")
        trainer._load_from_checkpoint(checkpoint)
        trainer.state.global_step = step
    else:
        trainer.train(resume_from_checkpoint=checkpoint)
    if interrupt.requested:
        if is_main_process():
            clear_staging(output_dir)
        return TrainResult(trainer.model, output_dir, None, trainer.state.global_step, True, checked.skipped,
                           stop_signal=interrupt.signal_number)
    model_dir = output_dir / "model"
    save_final(trainer, processor, config, model_dir)
    if is_main_process():
        mark_model_step(output_dir, trainer.state.global_step)
        clear_staging(output_dir)
        write_model_card(model_dir, config, trainer.state.global_step, len(train_set), checked.skipped)
        write_report(output_dir, config, trainer.state.global_step, len(train_set), checked.skipped)
    return TrainResult(trainer.model, output_dir, model_dir, trainer.state.global_step, False, checked.skipped)


def save_final(trainer, processor: Phi3VProcessor, config: TrainConfig, model_dir: Path) -> None:
    """Official layout for full weights (bf16 when trained in bf16), or the adapter; the base's other files.

    Written into the staging folder and renamed into place like a checkpoint, so `model/` is whole
    or absent (an earlier run's `model/` stays whole until the new one replaces it). ZeRO-3
    partitions the weights themselves: they are gathered onto rank 0 first and saved the same way.
    """
    staged = staging_dir(model_dir.parent) / model_dir.name
    if is_main_process():
        shutil.rmtree(staged, ignore_errors=True)
    try:
        if config.method in ("lora", "qlora"):
            trainer.save_model(str(staged))
            if is_main_process():
                (staged / "training_args.bin").unlink(missing_ok=True)
                complete_model_folder(staged, processor, config.model)
        else:
            model = trainer.accelerator.unwrap_model(trainer.model)
            zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
            weights = trainer.accelerator.get_state_dict(trainer.model_wrapped) if zero3 else None
            if is_main_process():
                precision = "bf16" if compute_dtype(config) == torch.bfloat16 else None
                with weights_in_place(model, weights):
                    save_model_folder(model, processor, staged, precision, base=config.model)
    except Exception as error:  # torch and safetensors report a full disk as their own errors
        reason = write_failure(error, model_dir.parent)
        if reason is None:
            raise
        if is_main_process():
            shutil.rmtree(staged, ignore_errors=True)
        raise PhivisionError(f"saving the final model to {model_dir} failed ({reason}); "
                             "the checkpoints are intact: free disk space and run again with --resume auto") from None
    trainer.accelerator.wait_for_everyone()
    if is_main_process():
        publish(staged, model_dir)
    trainer.accelerator.wait_for_everyone()


@contextmanager
def weights_in_place(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """The model holding the full `weights` (ZeRO-3's gathered state dict) while it is saved; None: as it is."""
    if weights is None:
        yield
        return
    entries = model.state_dict(keep_vars=True)
    partitioned = {name: tensor.data for name, tensor in entries.items()}
    for name, tensor in entries.items():
        tensor.data = weights[name]
    try:
        yield
    finally:
        for name, tensor in entries.items():
            tensor.data = partitioned[name]
