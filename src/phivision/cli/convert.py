"""`phivision convert NAME SRC OUT`: a public dataset, as downloaded, to `OUT/{name}_{split}.jsonl` + `OUT/images/`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from phivision.data.converters import CONVERTERS
from phivision.errors import PhivisionError

# option name -> (flag, help); these only make sense for videos
VIDEO_OPTIONS = {
    "frames": ("--frames", "frames sampled per video (default 8)"),
    "split": ("--split", "official train/test split of the full UCF-101 layout: 1, 2 or 3 (default 1)"),
    "val_groups": (
        "--val-groups",
        "full UCF-101 layout: the N highest-numbered groups of the train list become the val split (default 3)",
    ),
    "workers": ("--workers", "processes decoding videos in parallel (default: one per CPU core)"),
}
SUMMARY_LINES = {
    "skipped": "already converted, not decoded again",
    "unlabeled": "without a label or answer, left out",
    "failed": "unreadable or missing, left out",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=list(CONVERTERS), help="dataset to convert")
    parser.add_argument("src", type=Path, help="the dataset folder as downloaded, in its public layout")
    parser.add_argument("out", type=Path, help="output folder for NAME_SPLIT.jsonl files and images/")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable video or missing image instead of leaving it out",
    )
    video = parser.add_argument_group("ucf101 options")
    for key, (flag, help_text) in VIDEO_OPTIONS.items():
        video.add_argument(flag, dest=key, type=int, metavar="N", help=help_text)


def run(args: argparse.Namespace) -> int:
    from phivision.data.converters import get_converter

    video_options = {key: getattr(args, key) for key in VIDEO_OPTIONS if getattr(args, key) is not None}
    if args.name != "ucf101" and video_options:
        flags = ", ".join(VIDEO_OPTIONS[key][0] for key in video_options)
        raise PhivisionError(f"{flags}: ucf101 options, not used by {args.name}; remove them")
    options: dict[str, object] = {"strict": args.strict}
    if args.name == "ucf101":
        options.update({"workers": os.cpu_count() or 1, **video_options})
    summary = get_converter(args.name)(args.src, args.out, **options)
    if not summary["records"]:
        print(f"no samples written to {args.out}")
    for split, count in summary["records"].items():
        print(f"{split}: {count} samples -> {summary['files'][split]}")
    for key, meaning in SUMMARY_LINES.items():
        if key in summary:
            print(f"{key}: {summary[key]} ({meaning})")
    return 0
