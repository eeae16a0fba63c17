"""What a run leaves for people: `report.md` with `loss.png`, and the model card `model/README.md`."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from phivision.train.config import TrainConfig

# The Trainer logs these beside every evaluation: timings, not results.
EVAL_BOOKKEEPING = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
# Task metrics live in [0, 1]; their plot axis says so even when a metric sits at 0.
BOUNDED_METRICS = ("eval_accuracy", "eval_anls")


def read_metrics(path: Path) -> list[dict]:
    """The records of a `metrics.jsonl`; a line cut off by a killed process is left out."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def eval_results(logs: dict) -> dict[str, float]:
    """The evaluation results in a log line (eval loss, task metric), without the Trainer's timings."""
    return {key: value for key, value in logs.items()
            if key.startswith("eval_") and key not in EVAL_BOOKKEEPING and isinstance(value, (int, float))}


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def curves_figure(records: list[dict]):
    """Loss (train and eval) above, task metrics on 0..1 below, against the step; None when nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # not pyplot: a notebook's plotting backend stays as it was

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not train:
        return None
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    metric_keys = sorted({key for r in records for key in eval_results(r) if key != "eval_loss"})
    figure = Figure(figsize=(7, 6.5 if metric_keys else 4))
    FigureCanvasAgg(figure)
    panels = figure.subplots(2 if metric_keys else 1, 1, sharex=True, squeeze=False)[:, 0]
    loss_axis = panels[0]
    loss_axis.plot(*zip(*train), label="train loss")
    if evals:
        loss_axis.plot(*zip(*evals), "o-", label="eval loss")
    loss_axis.set_ylabel("loss")
    loss_axis.legend(loc="upper right")
    loss_axis.grid(alpha=0.3)
    if metric_keys:
        metric_axis = panels[1]
        for key in metric_keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            metric_axis.plot(*zip(*points), "s-", label=key.removeprefix("eval_"))
        if all(key in BOUNDED_METRICS for key in metric_keys):
            metric_axis.set_ylim(-0.02, 1.02)
        metric_axis.set_ylabel("task metric (eval)")
        metric_axis.legend(loc="upper left")
        metric_axis.grid(alpha=0.3)
    panels[-1].set_xlabel("optimiser step")
    figure.tight_layout()
    return figure


def plot_curves(records: list[dict], path: Path) -> bool:
    figure = curves_figure(records)
    if figure is None:
        return False
    figure.savefig(path, dpi=110)
    return True


def precision_used(config: TrainConfig) -> str:
    """`auto` resolved to what the run computed in."""
    from phivision.model.weights import DTYPES
    from phivision.train.methods import compute_dtype

    return {dtype: name for name, dtype in DTYPES.items()}[compute_dtype(config)]


def summary_lines(config: TrainConfig, steps: int, samples: int, skipped: int, records: list[dict]) -> list[str]:
    """The facts of a run, as markdown bullets, shared by the report and the model card."""
    losses = [r["loss"] for r in records if "loss" in r]
    speeds = [r["images_per_second"] for r in records if "images_per_second" in r]
    runtime = [r["train_runtime"] for r in records if "train_runtime" in r]
    method = config.method
    if method in ("lora", "qlora"):
        method += f" (rank {config.lora_rank}, alpha {config.resolved_lora_alpha:g})"
    lines = [
        f"- method **{method}**, precision {precision_used(config)}, attention {config.attn}, "
        f"num_crops {config.num_crops}, packing {'on' if config.packing else 'off'}",
        f"- base model `{config.model}`",
        f"- data `{config.train_data}`: {plural(samples, 'sample')}" + (f", {skipped:,} skipped" if skipped else ""),
        f"- {plural(steps, 'optimiser step')}, global batch {config.global_batch_size}, "
        f"learning rate {config.resolved_learning_rate:g} ({config.lr_scheduler}, {config.warmup_steps} warm-up)",
    ]
    if losses:
        lines.append(f"- train loss {losses[0]:.4f} (first log) -> {losses[-1]:.4f} (last log)")
    if speeds:
        lines.append(f"- throughput {sum(speeds) / len(speeds):.2f} images/s (mean of logged windows)")
    if runtime:
        lines.append(f"- wall time {runtime[-1]:.1f} s")
    for key in sorted({key for r in records for key in eval_results(r)}):
        values = [r[key] for r in records if key in r]
        lines.append(f"- {key.removeprefix('eval_')} on `{config.eval_data}`: {values[-1]:.4f} "
                     f"(last of {plural(len(values), 'evaluation')})")
    return lines


def write_report(output_dir: Path, config: TrainConfig, steps: int, samples: int, skipped: int) -> Path:
    records = read_metrics(output_dir / "metrics.jsonl")
    lines = [f"# phivision run: {output_dir.name}", "", *summary_lines(config, steps, samples, skipped, records)]
    if (output_dir / "model").is_dir():
        lines.append("- result: [model/](model/) (see its README.md)")
    if plot_curves(records, output_dir / "loss.png"):
        lines += ["", "![loss and task metric](loss.png)"]
    path = output_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def launch_command() -> str:
    """How this process was started, as a user would type it."""
    program = Path(sys.argv[0])
    if program.name == "phivision" or program.parts[-2:] == ("cli", "main.py"):
        command = "phivision " + shlex.join(sys.argv[1:])
    else:
        command = shlex.join(["python", *sys.argv])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return command + (f"  (under torchrun, {world} processes)" if world > 1 else "")


def write_model_card(model_dir: Path, config: TrainConfig, steps: int, samples: int, skipped: int) -> Path:
    """`model/README.md`: what this folder is and how it was made (instead of peft's empty template)."""
    records = read_metrics(model_dir.parent / "metrics.jsonl")
    adapter = config.method in ("lora", "qlora")
    kind = "a LoRA adapter for" if adapter else "a full fine-tune of"
    base_name = Path(config.model).name
    front = ["---", f"base_model: {base_name}", f"library_name: {'peft' if adapter else 'transformers'}",
             "tags:", "- phivision", "- phi3_v", f"- {config.method}", "---"]
    use = (f"phivision predict --model {shlex.quote(config.model)} --adapter {shlex.quote(str(model_dir))} "
           "--image IMAGE --prompt QUESTION\n"
           f"phivision export --run {shlex.quote(str(model_dir.parent))} --out MERGED_DIR   # merged full checkpoint"
           if adapter else
           f"phivision predict --model {shlex.quote(str(model_dir))} --image IMAGE --prompt QUESTION")
    lines = [
        *front, "",
        f"# {model_dir.parent.name}", "",
        f"This folder is {kind} `{base_name}` (Phi-3-V), trained with phivision.", "",
        *summary_lines(config, steps, samples, skipped, records),
        f"- command: `{launch_command()}`", "",
        "## Use", "", "```bash", use, "```", "",
    ]
    path = model_dir / "README.md"
    path.write_text("\n".join(lines))
    return path
