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
from phivision.processing.folder import save_model_folder
from phivision.processing.processor import Phi3VProcessor
from phivision.train.checkpoints import (
    check_fresh_output,
    checkpoint_step,
    clear_staging,
    resolve_resume,
    staging_dir,
    truncate_metrics,
)
from phivision.train.config import TrainConfig
from phivision.train.methods import compute_dtype, load_for_training, trainable_summary
from phivision.train.report import write_report
from phivision.train.callbacks import GracefulInterruptCallback, MetricsFileCallback, ProgressBarCallback
from phivision.train.trainer import PhivisionTrainer

if TYPE_CHECKING:
    from transformers import TrainingArguments

DEEPSPEED_PRESETS = ("zero2", "zero3")

T = TypeVar("T")


@dataclass
class TrainResult:
    model: object
    output_dir: Path
    model_dir: Path | None
    global_step: int
    interrupted: bool
    skipped_samples: int


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
        dataloader_num_workers=config.dataloader_workers,
        dataloader_persistent_workers=config.dataloader_workers > 0,
        report_to=config.report_to or "none",
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        ddp_timeout=config.ddp_timeout,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )


def run_training(config: TrainConfig, resume: str | None = None, callbacks: list | None = None) -> TrainResult:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    output_dir = Path(config.output_dir)
    if config.deepspeed:
        single_process_rendezvous()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config.gradient_accumulation(world_size)
    checkpoint = resolve_resume(resume, output_dir)
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
    )
    for callback in callbacks or []:
        if hasattr(callback, "attach"):
            callback.attach(trainer)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train(resume_from_checkpoint=checkpoint)
    if interrupt.requested:
        return TrainResult(trainer.model, output_dir, None, trainer.state.global_step, True, checked.skipped)
    model_dir = output_dir / "model"
    save_final(trainer, processor, config, model_dir)
    if is_main_process():
        write_report(output_dir, config, trainer.state.global_step, len(train_set), checked.skipped)
    return TrainResult(trainer.model, output_dir, model_dir, trainer.state.global_step, False, checked.skipped)


def save_final(trainer, processor: Phi3VProcessor, config: TrainConfig, model_dir: Path) -> None:
    """Official layout for full weights (bf16 when trained in bf16), or the adapter; processor files.

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
                processor.save_pretrained(staged)
        else:
            model = trainer.accelerator.unwrap_model(trainer.model)
            zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
            weights = trainer.accelerator.get_state_dict(trainer.model_wrapped) if zero3 else None
            if is_main_process():
                precision = "bf16" if compute_dtype(config) == torch.bfloat16 else None
                with weights_in_place(model, weights):
                    save_model_folder(model, processor, staged, precision)
    except OSError as error:
        if is_main_process():
            shutil.rmtree(staged, ignore_errors=True)
        raise PhivisionError(f"saving the final model to {model_dir} failed ({error.strerror or error}); "
                             "the checkpoints are intact: free disk space and run again with --resume auto") from None
    trainer.accelerator.wait_for_everyone()
    if is_main_process():
        replace_folder(staged, model_dir)
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


def replace_folder(staged: Path, final: Path) -> None:
    """`final` is the old folder or the new one at every instant: the old one is renamed aside, then deleted."""
    aside = staged.with_name(f"{staged.name}.replaced")
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        final.rename(aside)
    staged.rename(final)
    shutil.rmtree(aside, ignore_errors=True)
