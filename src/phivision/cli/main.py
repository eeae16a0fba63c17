"""`phivision` command line: one module per subcommand, imported only when it runs."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from phivision.errors import PhivisionError
from phivision.quiet import quiet_libraries

# name -> (module under phivision.cli, one-line help)
COMMANDS = {
    "init-tiny": ("init_tiny", "write a random-weight Phi-3-V model folder (tiny or small preset)"),
    "validate": ("validate", "check a jsonl dataset and its images, print problems and a summary"),
    "convert": ("convert", "convert a public dataset (ucf101, docvqa, hateful-memes, nlvr2) to jsonl"),
    "train": ("train", "fine-tune from a YAML config or a shipped recipe"),
    "recipes": ("recipes", "list the shipped training recipes, or print one"),
    "eval": ("eval", "batched generation and metrics on a jsonl dataset"),
    "predict": ("predict", "answer one prompt about images or a video"),
    "export": ("export", "merge a LoRA run into a full checkpoint in the official layout"),
    "demo": ("demo", "train a tiny model on real handwritten digits, end to end on a CPU"),
    "bench": ("bench", "throughput, memory and MFU per training method"),
}


def build_parser(available_only: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phivision", description="Fine-tune Phi-3.5-vision on your own data.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(f"phivision.cli.{module_name}")
        except ModuleNotFoundError as error:
            if available_only and error.name == f"phivision.cli.{module_name}":
                continue
            raise
        command_parser = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        result = args.run(args)
    except PhivisionError as error:
        print(f"phivision {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"phivision {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`phivision validate ... | head`): stop quietly. Python flushes stdout
        # again at exit, which would fail the same way, so point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
