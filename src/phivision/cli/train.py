"""`phivision train CONFIG.yaml [--set key=value ...] [--resume auto|PATH]`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML training config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set method=qlora --set max_steps=100")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the latest complete checkpoint in output_dir (auto) or from PATH")


def run(args: argparse.Namespace) -> int:
    from phivision.train.config import load_config

    config = load_config(args.config, args.overrides)
    from phivision.cli.distributed import process_group_left_on_exit
    from phivision.cli.evaluation_callback import task_metric_callbacks
    from phivision.train.run import run_training

    with process_group_left_on_exit():
        result = run_training(config, resume=args.resume, callbacks=task_metric_callbacks(config))
    if result.interrupted:
        overrides = "".join(f" --set {override}" for override in args.overrides)
        print(f"stopped at step {result.global_step}; resume with the same launcher and: "
              f"phivision train {args.config}{overrides} --resume auto")
        return 130
    print(f"done: {result.global_step} steps; model in {result.model_dir}; report in {result.output_dir / 'report.md'}")
    return 0
