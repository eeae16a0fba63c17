"""Where one training step's time goes, by kind of operation, on one data path of `phivision bench`.

    PYTHONPATH=src python bench/profile_step.py [--preset clip-l] [--path phivision|official]
        [--workload docvqa] [--num-crops 4] [--batch-size 2] [--vision-chunk 5] [--micro-batch N]
        [--method full]

Builds the model and samples exactly as `phivision bench` does, runs `--warmup` untimed steps,
then one step under `torch.profiler` and prints the step's self time per kind of operation
(matrix products, attention kernels, softmax, elementwise, layout copies, norms, the optimiser)
and the operations that took the most time.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

from phivision.bench.models import bench_processor, build_model
from phivision.bench.runner import (
    DATA_PATHS,
    BenchSettings,
    label_count,
    make_optimizer,
    official_compute,
    step_passes,
    train_step,
)
from phivision.bench.workloads import encode_samples, sample_shapes
from phivision.data.collate import Collator

KINDS = (
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
                         "convolution")),
    ("attention kernels", ("scaled_dot_product", "flash_attention")),
    ("softmax", ("softmax",)),
    ("norms", ("layer_norm", "rms_norm")),
    ("optimiser", ("adam",)),
    ("layout copies", ("aten::copy_", "aten::cat", "aten::index", "aten::contiguous", "aten::clone",
                       "aten::masked_select", "aten::nonzero", "aten::stack", "aten::fill_", "aten::zero_")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sigmoid", "aten::gelu", "aten::silu", "aten::div", "aten::sub",
                     "aten::pow", "aten::rsqrt", "aten::neg", "aten::sum", "aten::mean", "aten::exp", "aten::cos",
                     "aten::sin", "aten::where", "aten::threshold", "_backward")),
)


def kind_of(name: str) -> str:
    for kind, markers in KINDS:
        if any(marker in name for marker in markers):
            return kind
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="clip-l")
    parser.add_argument("--path", choices=("phivision", "official", "padded"), default="phivision")
    parser.add_argument("--method", default="full")
    parser.add_argument("--workload", default="docvqa")
    parser.add_argument("--num-crops", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--vision-chunk", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()

    settings = BenchSettings(method=args.method, workload=args.workload, data_paths=[args.path], preset=args.preset,
                             batch_size=args.batch_size, num_crops=args.num_crops,
                             vision_crops_per_chunk=args.vision_chunk or None)
    path = DATA_PATHS[args.path]
    processor = bench_processor(args.preset, None)
    steps = args.warmup + 1
    encodings = encode_samples(sample_shapes(args.workload, steps * args.batch_size, args.num_crops), processor)
    collator = Collator(processor.tokenizer.pad_id, processor.crop_size, path.packing)
    config = settings.train_config(path)
    model = build_model(args.preset, None, config, torch.device("cpu"), fp32_weights=path.fp32_weights).train()
    optimizer = make_optimizer(model, config.resolved_learning_rate)
    batches = [encodings[start:start + args.batch_size] for start in range(0, len(encodings), args.batch_size)]
    no_autocast = torch.autocast("cpu", enabled=False)
    with official_compute(model, path.official_compute):
        for batch in batches[:-1]:
            train_step(model, optimizer, step_passes(batch, path, collator, args.micro_batch), no_autocast, label_count(batch))
        batch = batches[-1]
        passes = step_passes(batch, path, collator, args.micro_batch)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            loss = train_step(model, optimizer, passes, no_autocast, label_count(batch))
        elapsed = time.perf_counter() - start

    events = [event for event in profiler.key_averages() if event.self_cpu_time_total > 0]
    total = sum(event.self_cpu_time_total for event in events)
    by_kind: collections.Counter[str] = collections.Counter()
    for event in events:
        by_kind[kind_of(event.key)] += event.self_cpu_time_total
    crops = sum(int(encoding.pixel_values.shape[:2].numel()) for encoding in batch if encoding.num_images)
    print(f"{args.path} | preset {args.preset} | {args.method} | {len(batch)} samples, {crops} crop slots, "
          f"{sum(len(encoding) for encoding in batch)} tokens | loss {loss:.5f} | step {elapsed:.1f} s under the "
          f"profiler, {total / 1e6:.1f} s of operator self time | {torch.get_num_threads()} threads")
    for kind, micros in by_kind.most_common():
        print(f"  {kind:<18} {micros / 1e6:8.2f} s  {100 * micros / total:5.1f}%")
    print(f"  {'operation':<58} {'self s':>8} {'share':>6} {'calls':>6}")
    for event in sorted(events, key=lambda event: -event.self_cpu_time_total)[:args.rows]:
        print(f"  {event.key[:58]:<58} {event.self_cpu_time_total / 1e6:8.2f} "
              f"{100 * event.self_cpu_time_total / total:5.1f}% {event.count:>6}")


if __name__ == "__main__":
    main()
