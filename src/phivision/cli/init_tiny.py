"""`phivision init-tiny OUT`: a complete random-weight model folder, usable wherever a checkpoint is."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="folder to write (config, safetensors, tokenizer, processor config)")
    parser.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--num-crops", type=int, default=4, help="default crops per image in the processor config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace the weights already in OUT")


def run(args: argparse.Namespace) -> int:
    from phivision.processing.folder import write_random_model

    write_random_model(args.out, preset=args.preset, num_crops=args.num_crops, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a random {args.preset} Phi-3-V model to {args.out}")
    return 0
