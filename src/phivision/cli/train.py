"""`phivision train CONFIG.yaml|RECIPE [--set key=value ...] [--resume auto|PATH]`, and `train_model` for Python."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from phivision.train.config import TrainConfig
    from phivision.train.run import TrainResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML training config, or the name of a shipped recipe "
                                       "(`phivision recipes` lists them)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set method=qlora --set max_steps=100")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the latest complete checkpoint in output_dir (auto) or from PATH")


def train_model(
    config: TrainConfig | Mapping | str | Path,
    overrides: list[str] | None = None,
    resume: str | None = None,
) -> TrainResult:
    """Fine-tune exactly as `phivision train` does (checks, output folder, task metric every `eval_steps`).

    `config` is a TrainConfig, a dict of config keys, a YAML file or a recipe name; `overrides`
    are `key=value` strings as for `--set` (not for a TrainConfig: set its fields instead).
    """
    from phivision.errors import PhivisionError
    from phivision.recipes import resolve_config_path
    from phivision.train.config import TrainConfig, load_config, validate

    if isinstance(config, TrainConfig):
        if overrides:
            raise PhivisionError("overrides apply to a dict, a YAML file or a recipe: set the TrainConfig's fields")
        validate(config)
    elif isinstance(config, Mapping):
        values = {key: os.fspath(value) if isinstance(value, os.PathLike) else value for key, value in config.items()}
        config = load_config(None, overrides, base=values)
    else:
        config = load_config(resolve_config_path(config), overrides)
    # Imported once the config is known to be good: a config error stops before transformers loads.
    from phivision.cli.distributed import process_group_left_on_exit
    from phivision.cli.evaluation_callback import task_metric_callbacks
    from phivision.quiet import DEEPSPEED_BUILD_LINE, stdout_without
    from phivision.train.run import run_training

    with process_group_left_on_exit(), stdout_without(DEEPSPEED_BUILD_LINE):
        return run_training(config, resume=resume, callbacks=task_metric_callbacks(config))


def run(args: argparse.Namespace) -> int:
    from phivision.train.run import is_main_process

    result = train_model(args.config, args.overrides, args.resume)
    main = is_main_process()  # under torchrun, one summary for the job
    if result.already_finished:
        if main:
            print(f"already finished: {result.global_step} steps, model in {result.model_dir}; nothing to train "
                  "(raise max_steps or epochs to continue the run)")
        return 0
    if result.interrupted:
        overrides = "".join(f" --set {override}" for override in args.overrides)
        if main:
            print(f"stopped at step {result.global_step}; resume with the same launcher and: "
                  f"phivision train {args.config}{overrides} --resume auto", flush=True)
        return 128 + result.stop_signal  # 130 after Ctrl-C (SIGINT), 143 after SIGTERM
    if main:
        print(f"done: {result.global_step} steps; model in {result.model_dir}; "
              f"report in {result.output_dir / 'report.md'}")
    return 0
