"""One benchmark measurement: build the model for a method, warm up, time real training steps.

`phivision bench` runs this module in a fresh process per method (`python -m
phivision.bench.runner SETTINGS.json RESULT.json`), so the peak memory it reports (tensor bytes
during the steps, and the process's RSS) belongs to that method alone. A `--compare` process measures the
three data paths one after another on the same samples and weights.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from phivision.bench.flops import Learning, ModelShape, SampleWork, peak_matmul_flops, step_flops, synchronize
from phivision.bench.memory import TensorPeak, model_tensors, peak_rss, reset_peak_rss, resident_memory, storage_bytes
from phivision.bench.models import build_model, bench_processor
from phivision.bench.workloads import encode_samples, sample_shapes
from phivision.data.collate import Collator
from phivision.model.modeling import Phi3VForCausalLM
from phivision.model.vision import CLIPVisionTower, Phi3VImageEmbedding
from phivision.processing.processor import IGNORE_INDEX, Encoded
from phivision.train.config import TrainConfig
from phivision.train.methods import compute_dtype, parameter_count


@dataclass(frozen=True)
class DataPath:
    """How a step feeds the model: the knobs that differ between phivision and the official recipe."""

    label: str
    packing: bool = True
    one_sample_per_pass: bool = False  # batch 1 with gradient accumulation
    eager_attention: bool = False
    fp32_weights: bool = False  # every floating weight in fp32, the compute under autocast
    official_compute: bool = False  # CLIP's every layer on every crop slot, logits at every position


DATA_PATHS = {
    "phivision": DataPath("(a) phivision: packed, sdpa, padding crops skipped"),
    "official": DataPath("(b) official recipe: batch 1 + accumulation, eager, fp32 weights, all of CLIP on every crop",
                         packing=False, one_sample_per_pass=True, eager_attention=True, fp32_weights=True,
                         official_compute=True),
    "padded": DataPath("(c) right-padded batches", packing=False),
}


@dataclass
class BenchSettings:
    """Everything one measurement process needs; written as JSON by the command."""

    method: str
    workload: str
    data_paths: list[str]
    steps: int = 10
    warmup: int = 2
    batch_size: int = 4
    preset: str | None = "small"
    model_dir: str | None = None
    precision: str = "auto"
    attn: str = "sdpa"
    lora_rank: int = 64
    seed: int = 0
    matmul_size: int = 0  # 0: 2048 on a CPU, 8192 on a GPU
    threads: int = 0  # CPU threads; 0: PyTorch's default (every core)
    gradient_checkpointing: bool | None = None  # None: the method's training default
    num_crops: int | None = None  # caps every image's crop budget; None: each workload's own
    vision_crops_per_chunk: int | None = None  # phivision's paths only: the official code has no such bound
    micro_batch: int | None = None  # samples per pass on phivision's paths; None: a step's samples in one pass

    def train_config(self, path: DataPath) -> TrainConfig:
        return TrainConfig(model=self.model_dir or f"preset:{self.preset}", train_data="-", output_dir="-",
                           method=self.method, precision=self.precision,
                           attn="eager" if path.eager_attention else self.attn, lora_rank=self.lora_rank,
                           gradient_checkpointing=self.gradient_checkpointing,
                           vision_crops_per_chunk=None if path.official_compute else self.vision_crops_per_chunk)


@dataclass
class PathResult:
    """Figures of one method on one data path; throughput counts only the timed (post warm-up) steps."""

    data_path: str
    images_per_s: float
    samples_per_s: float
    tokens_per_s: float
    step_time_s: float
    step_time_min_s: float
    step_time_max_s: float
    losses: list[float]
    flops_per_step: float
    achieved_flops_per_s: float
    peak_matmul_flops_per_s: float
    mfu: float
    peak_memory_bytes: int  # tensors: the profiler's count on a CPU, CUDA peak allocated on a GPU
    peak_rss_bytes: int
    memory_before_model_bytes: int  # RSS
    gradient_checkpointing: bool
    trainable_parameters: int
    total_parameters: int


def device_for_run() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def official_inputs(encoding: Encoded, collator: Collator) -> dict[str, torch.Tensor]:
    """One sample as the official code gets it: batch 1, every one of the N + 1 crop slots."""
    inputs = collator([encoding])
    if encoding.num_images:
        inputs["pixel_values"] = encoding.pixel_values
    return inputs


def step_passes(encodings: list[Encoded], path: DataPath, collator: Collator,
                micro_batch: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The forward/backward passes of one optimiser step: `micro_batch` samples per pass (None: all)."""
    if path.one_sample_per_pass:
        return [official_inputs(encoding, collator) for encoding in encodings]
    size = micro_batch or len(encodings)
    return [collator(encodings[start:start + size]) for start in range(0, len(encodings), size)]


@contextlib.contextmanager
def official_compute(model: torch.nn.Module, enabled: bool):
    """Switch the model to the official code's work for a while: CLIP's every layer on every crop slot
    (zero padding included, the last layer's output unused), logits at every position."""
    embeddings = [m for m in model.modules() if isinstance(m, Phi3VImageEmbedding)]
    towers = [m for m in model.modules() if isinstance(m, CLIPVisionTower)]
    heads = [m for m in model.modules() if isinstance(m, Phi3VForCausalLM)]
    for module in embeddings:
        module.encode_padding_crops = enabled
    for module in towers:
        module.run_unused_layers = enabled
    for module in heads:
        module.supervised_logits_only = not enabled
    try:
        yield
    finally:
        for module in embeddings:
            del module.encode_padding_crops
        for module in towers:
            del module.run_unused_layers
        for module in heads:
            del module.supervised_logits_only


def to_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in inputs.items()}


def make_optimizer(model: torch.nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW as phivision's Trainer builds it (fused, the official betas and epsilon, decay on matrices)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": 0.01},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-7, fused=True)


def train_step(model, optimizer, passes, autocast: contextlib.AbstractContextManager, label_count: int) -> float:
    """Forward and backward of every pass (the loss a token mean over the whole step), clip, step."""
    total = None
    for inputs in passes:
        with autocast:
            loss = model(**inputs, num_items_in_batch=label_count).loss
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total)


def label_count(encodings: list[Encoded]) -> int:
    return sum(int((encoding.labels[1:] != IGNORE_INDEX).sum()) for encoding in encodings)


def timed_steps(model, optimizer, batches: list[list[Encoded]], passes: list[list[dict]], autocast,
                device: torch.device, warmup: int, tag: str) -> tuple[list[float], list[float]]:
    """Losses of every step and wall times of the steps after the warm-up."""
    losses, times = [], []
    for index, (batch, step_inputs) in enumerate(zip(batches, passes)):
        labels = label_count(batch)
        synchronize(device)
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, step_inputs, autocast, labels))
        synchronize(device)
        seconds = time.perf_counter() - start
        if index >= warmup:
            times.append(seconds)
        print(f"  {tag} step {index + 1}/{len(batches)}: loss {losses[-1]:.4f} ({seconds:.1f} s)", file=sys.stderr,
              flush=True)
    return losses, times


def heaviest_steps_tensor_peak(model, optimizer, batches: list[list[Encoded]], passes: list[list[dict]], autocast,
                               device: torch.device) -> int:
    """Peak tensor bytes of one more step on the batch with the most tokens and on the one with the most pixels.

    Run after the timed steps, so the CPU's profiler does not slow them, and with the optimiser's
    states in place, as every step after the first has them. On a CPU only the inputs of these
    steps count, as in training; on a GPU, CUDA's count also holds the other steps' inputs, which
    the benchmark moves there up front (small beside a GPU-sized model).
    """
    def pixels(step: list[dict]) -> int:
        return sum(inputs["pixel_values"].numel() for inputs in step if "pixel_values" in inputs)

    def tokens(step: list[dict]) -> int:
        return sum(inputs["input_ids"].numel() for inputs in step)

    heaviest = sorted({max(range(len(passes)), key=lambda index: tokens(passes[index])),
                       max(range(len(passes)), key=lambda index: pixels(passes[index]))})
    inputs = [tensor for index in heaviest for inputs in passes[index] for tensor in inputs.values()]
    states = [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
    with TensorPeak(device, resident=storage_bytes(model_tensors(model) + states + inputs)) as peak:
        for index in heaviest:
            train_step(model, optimizer, passes[index], autocast, label_count(batches[index]))
    return peak.bytes


def measure_path(settings: BenchSettings, name: str, encodings: list[Encoded], collator: Collator) -> PathResult:
    """Build the model for this data path, run warm-up and timed steps, and collect the figures."""
    path = DATA_PATHS[name]
    device = device_for_run()
    config = settings.train_config(path)
    dtype = compute_dtype(config)
    gc.collect()  # the previous path's model, if any, held in reference cycles
    reset_peak_rss()
    memory_before_model = resident_memory()
    model = build_model(settings.preset, settings.model_dir, config, device, settings.seed, path.fp32_weights)
    model.train()
    optimizer = make_optimizer(model, config.resolved_learning_rate)
    batches = [encodings[start:start + settings.batch_size] for start in range(0, len(encodings), settings.batch_size)]
    passes = [[to_device(inputs, device) for inputs in step_passes(batch, path, collator, settings.micro_batch)]
              for batch in batches]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with official_compute(model, path.official_compute):
        losses, times = timed_steps(model, optimizer, batches, passes, autocast, device, settings.warmup,
                                    f"{settings.method} {name}")
        rss = peak_rss()
        tensor_peak = heaviest_steps_tensor_peak(model, optimizer, batches, passes, autocast, device)
    timed = batches[settings.warmup:]
    elapsed = sum(times)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shape, learning = ModelShape.from_config(base.config), Learning.for_method(settings.method, settings.lora_rank)
    flops = [step_flops(shape, learning, [SampleWork.of(e, collator.crop_size) for e in batch]) for batch in timed]
    return PathResult(
        data_path=name,
        images_per_s=sum(encoding.num_images for batch in timed for encoding in batch) / elapsed,
        samples_per_s=sum(map(len, timed)) / elapsed,
        tokens_per_s=sum(len(encoding) for batch in timed for encoding in batch) / elapsed,
        step_time_s=statistics.median(times), step_time_min_s=min(times), step_time_max_s=max(times),
        losses=losses, flops_per_step=sum(flops) / len(flops), achieved_flops_per_s=sum(flops) / elapsed,
        peak_matmul_flops_per_s=0.0, mfu=0.0,  # filled in by `run`, from the best matmul measurement
        peak_memory_bytes=tensor_peak, peak_rss_bytes=rss,
        memory_before_model_bytes=memory_before_model, gradient_checkpointing=config.resolved_gradient_checkpointing,
        trainable_parameters=parameter_count(model, trainable_only=True), total_parameters=parameter_count(model),
    )


def run(settings: BenchSettings) -> list[PathResult]:
    """Every requested data path of one method, on the same samples, in this process.

    The matmul peak is measured before the first path and after the last, and the better of the
    two is every path's MFU denominator: on a shared machine the best is the closest to the peak.
    """
    processor = bench_processor(settings.preset, settings.model_dir)
    count = (settings.warmup + settings.steps) * settings.batch_size
    encodings = encode_samples(sample_shapes(settings.workload, count, settings.num_crops), processor,
                               seed=settings.seed)
    device = device_for_run()
    dtype = compute_dtype(settings.train_config(DATA_PATHS["phivision"]))
    size = settings.matmul_size or (8192 if device.type == "cuda" else 2048)
    peaks = [peak_matmul_flops(device, dtype, size)]
    results = []
    for name in settings.data_paths:
        collator = Collator(processor.tokenizer.pad_id, processor.crop_size, DATA_PATHS[name].packing)
        results.append(measure_path(settings, name, encodings, collator))
    peaks.append(peak_matmul_flops(device, dtype, size))
    for result in results:
        result.peak_matmul_flops_per_s = max(peaks)
        result.mfu = result.achieved_flops_per_s / max(peaks)
    return results


def run_in_subprocess(settings: BenchSettings, work_dir: Path) -> list[dict]:
    """`run` in a fresh Python process, so its peak memory is its own; its progress is echoed live."""
    import collections
    import subprocess

    settings_path = work_dir / f"{settings.method}-settings.json"
    result_path = work_dir / f"{settings.method}-result.json"
    settings_path.write_text(json.dumps(asdict(settings)))
    command = [sys.executable, "-m", "phivision.bench.runner", str(settings_path), str(result_path)]
    last_lines: collections.deque[str] = collections.deque(maxlen=15)
    environment = {"KINETO_LOG_LEVEL": "6", **os.environ}  # the profiler's start/stop lines are noise here
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=environment) as process:
        for line in process.stderr:
            sys.stderr.write(line)
            last_lines.append(line.rstrip())
    if process.returncode != 0:
        raise RuntimeError("\n".join(last_lines) or f"exit status {process.returncode}")
    return json.loads(result_path.read_text())


def main(argv: list[str]) -> int:
    from phivision.quiet import quiet_libraries

    quiet_libraries()
    settings_path, result_path = argv
    settings = BenchSettings(**json.loads(Path(settings_path).read_text()))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results = run(settings)
    Path(result_path).write_text(json.dumps([asdict(result) for result in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
