"""`phivision bench`: training throughput, peak memory and MFU per method on synthetic workloads.

Each method runs in its own process (clean peak memory). With `--compare`, that process also
runs the official recipe's data path and right-padded batches on the same samples and weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from phivision.cli.options import non_negative_int, positive_int
from phivision.errors import PhivisionError
from phivision.train.config import ATTENTIONS, METHODS

if TYPE_CHECKING:
    import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR", help="benchmark this checkpoint folder")
    source.add_argument("--preset", choices=("tiny", "small", "clip-l", "official"),
                        help="random weights of this shape (default: small, or clip-l with --compare; clip-l = the "
                             "official CLIP ViT-L/14-336 with the small decoder; official = the 4B model, for GPUs)")
    parser.add_argument("--method", choices=(*METHODS, "all"), default="all", help="training method (default: all)")
    parser.add_argument("--workload", choices=("docvqa", "memes", "video", "mixed"),
                        help="synthetic samples shaped like this dataset (default: mixed; docvqa for clip-l)")
    parser.add_argument("--num-crops", type=positive_int, metavar="N",
                        help="cap every image's crop budget at N (default: each workload's own, 16 for pages and "
                             "memes, 4 for pairs and video; 4 for clip-l, whose 16-crop steps do not fit a CPU's memory)")
    parser.add_argument("--vision-chunk", type=positive_int, metavar="N",
                        help="phivision's paths run CLIP over at most N crops at a time (vision_crops_per_chunk; "
                             "default: all at once; 5 for clip-l)")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed optimiser steps per method (default: 10)")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first (default: 2)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="samples per optimiser step (default: 4)")
    parser.add_argument("--micro-batch", type=positive_int, metavar="N",
                        help="phivision's paths pack N samples per forward pass and accumulate gradients over a step's "
                             "passes, as per_device_batch_size does in training (default: all of a step's samples)")
    parser.add_argument("--compare", nargs="?", const="official,padded", metavar="PATHS",
                        help="also run the official recipe's data path and right-padded batches on the same samples "
                             "and weights, and print ratios; PATHS limits it to some of official,padded")
    parser.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                        help="recompute activations in the backward pass (auto: as training does for the method, "
                             "on for qlora only)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="compute precision (auto: bf16 on a GPU that has it, else fp32)")
    parser.add_argument("--attn", choices=ATTENTIONS, default="sdpa")
    parser.add_argument("--lora-rank", type=positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--matmul-size", type=non_negative_int, default=0, metavar="N",
                        help="side of the square matmul that measures the device peak (default: 2048 CPU, 8192 GPU)")
    parser.add_argument("--threads", type=non_negative_int, default=0, metavar="N",
                        help="CPU threads per measurement (default: all cores); 1 is steadier on a busy machine")
    parser.add_argument("--output", default="bench.json", help="where to write the results (default: bench.json)")


def run(args: argparse.Namespace) -> int:
    from phivision.bench import report
    from phivision.bench.runner import DATA_PATHS, BenchSettings, device_for_run, run_in_subprocess
    methods = list(METHODS) if args.method == "all" else [args.method]
    _resolve_defaults(args)
    preset = None if args.model else args.preset
    data_paths = ["phivision", *_compared_paths(args.compare, DATA_PATHS)]
    base = BenchSettings(method=methods[0], workload=args.workload, data_paths=data_paths, steps=args.steps,
                         warmup=args.warmup, batch_size=args.batch_size, preset=preset, model_dir=args.model,
                         precision=args.precision, attn=args.attn, lora_rank=args.lora_rank, seed=args.seed,
                         matmul_size=args.matmul_size, threads=args.threads,
                         gradient_checkpointing={"auto": None, "on": True, "off": False}[args.gradient_checkpointing],
                         num_crops=args.num_crops, vision_crops_per_chunk=args.vision_chunk,
                         micro_batch=args.micro_batch)
    machine = report.machine_description()
    print(report.header(asdict(base), machine), flush=True)
    document = report.Document(_command_line(args), report.git_commit(), machine, {**asdict(base), "methods": methods})
    with tempfile.TemporaryDirectory(prefix="phivision-bench-") as scratch:
        work_dir = Path(scratch)
        for method in methods:
            settings = BenchSettings(**{**asdict(base), "method": method})
            print(f"{method}: measuring {', '.join(data_paths)}", file=sys.stderr, flush=True)
            try:
                if method == "qlora" and preset:
                    settings.model_dir = str(_preset_folder(preset, work_dir, args.seed, device_for_run()))
                document.add(method, run_in_subprocess(settings, work_dir))
                print(report.one_line(method, document.results[method]["phivision"]), file=sys.stderr, flush=True)
            except (RuntimeError, OSError) as error:  # out of memory, a crashed process: measure the rest
                document.errors[method] = str(error)
            document.write(Path(args.output))  # after every method, so a run cut short keeps what it measured
    print(document.tables(DATA_PATHS))
    print(f"wrote {args.output}")
    return 1 if document.errors else 0


# What `clip-l` runs unless told otherwise: pages at 4 crops (2x2 and the global view; at 16 crops
# the official path's step does not fit a CPU's memory), one sample per pass as training's default
# per_device_batch_size of 1 does (CLIP's passes are large enough that packing gains nothing, see
# BENCHMARKS.md), and CLIP over at most one page's crops at a time if `--micro-batch` packs more.
PRESET_DEFAULTS = {"clip-l": {"workload": "docvqa", "num_crops": 4, "micro_batch": 1, "vision_chunk": 5}}


def _resolve_defaults(args: argparse.Namespace) -> None:
    """Options left unset take the preset's defaults; `--compare` measures the real CLIP tower by default."""
    if not args.model and args.preset is None:
        args.preset = "clip-l" if args.compare else "small"
    defaults = {"workload": "mixed", "num_crops": None, "micro_batch": None, "vision_chunk": None,
                **PRESET_DEFAULTS.get(None if args.model else args.preset, {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _compared_paths(compare: str | None, known: dict) -> list[str]:
    names = [name.strip() for name in compare.split(",")] if compare else []
    unknown = [name for name in names if name not in known or name == "phivision"]
    if unknown:
        raise PhivisionError(f"--compare: unknown data path {unknown[0]!r}: choose from official, padded")
    return list(dict.fromkeys(names))


def _command_line(args: argparse.Namespace) -> str:
    """The command with every option spelled out, to rerun the same measurement."""
    source = f"--model {args.model}" if args.model else f"--preset {args.preset}"
    return (f"phivision bench {source} --method {args.method} --workload {args.workload} --steps {args.steps} "
            f"--warmup {args.warmup} --batch-size {args.batch_size} --precision {args.precision} --attn {args.attn} "
            f"--lora-rank {args.lora_rank} --seed {args.seed} --matmul-size {args.matmul_size} --threads {args.threads} "
            f"--gradient-checkpointing {args.gradient_checkpointing}"
            + (f" --num-crops {args.num_crops}" if args.num_crops else "")
            + (f" --vision-chunk {args.vision_chunk}" if args.vision_chunk else "")
            + (f" --micro-batch {args.micro_batch}" if args.micro_batch else "")
            + (f" --compare {args.compare}" if args.compare else ""))


def _preset_folder(preset: str, work_dir: Path, seed: int, device: torch.device) -> Path:
    """QLoRA quantises while loading, so a preset is written to a folder once, then loaded."""
    from phivision.bench.models import write_preset_folder

    folder = work_dir / f"{preset}-model"
    if not folder.is_dir():
        write_preset_folder(preset, folder, device, seed)
    return folder
