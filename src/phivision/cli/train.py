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
    from phivision.cli.evaluation_callback import task_metric_callbacks
    from phivision.train.run import is_main_process, run_training

    result = run_training(config, resume=args.resume, callbacks=task_metric_callbacks(config))
    if result.already_finished:
        if is_main_process():
            print(f"already finished: {result.global_step} steps, model in {result.model_dir}; nothing to train "
                  "(raise max_steps or epochs to continue the run)")
        return 0
    if result.interrupted:
        overrides = "".join(f" --set {override}" for override in args.overrides)
        if is_main_process():  # once, not once per torchrun process
            print(f"stopped at step {result.global_step}; resume with the same launcher and: "
                  f"phivision train {args.config}{overrides} --resume auto", flush=True)
        return 128 + result.stop_signal  # 130 after Ctrl-C (SIGINT), 143 after SIGTERM
    print(f"done: {result.global_step} steps; model in {result.model_dir}; report in {result.output_dir / 'report.md'}")
    return 0
