"""`phivision export --run DIR --out DIR`: merge a LoRA/QLoRA run into a full official-layout checkpoint."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # dest must not be `run`: main() dispatches on args.run, which `--run DIR` would overwrite.
    parser.add_argument("--run", dest="run_dir", required=True,
                        help="a phivision training output folder (lora or qlora)")
    parser.add_argument("--out", required=True, help="folder for the merged checkpoint")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16",
                        help="weights precision of the export (the official checkpoint is bf16)")
    parser.add_argument("--overwrite", action="store_true", help="write into --out even though it is not empty")


def run(args: argparse.Namespace) -> int:
    from phivision.evaluate.export import export_run

    difference = export_run(args.run_dir, args.out, args.precision, args.overwrite)
    print(f"exported {args.run_dir} to {args.out} ({args.precision}); "
          f"reloaded logits differ from the adapter-applied model by at most {difference:.3g}")
    return 0
