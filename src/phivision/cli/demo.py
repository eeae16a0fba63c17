"""`phivision demo`: the whole product on a laptop CPU, with nothing downloaded.

A tiny random Phi-3-V (real Phi-3 vocabulary) learns real handwritten digits from scikit-learn:
one image (`digits`), two images (`pairs`, NLVR2-style) and short videos converted with the
real UCF-101 converter (`motion`). Each task goes through the same commands a real run uses:
init-tiny, convert, validate, train (from a YAML config), eval before and after.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TASKS = ("digits", "pairs", "motion")

# Per task: training settings that fit the 5-minute CPU budget, and chance accuracy.
TASK_SETTINGS = {
    "digits": {"max_steps": 360, "chance": 0.10, "eval": "test.jsonl"},
    "pairs": {"max_steps": 500, "chance": 0.50, "eval": "test.jsonl"},
    "motion": {"max_steps": 500, "chance": 0.25, "eval": "ucf101_test.jsonl"},
}
# Enough clips that the model learns the direction rather than memorising the clips.
DEMO_MOTION_VIDEOS_PER_CLASS = {"train": 200, "val": 12, "test": 20}
TRAIN_DEFAULTS = {
    "method": "full", "num_crops": 1, "global_batch_size": 32, "per_device_batch_size": 32,
    "learning_rate": 3e-3, "warmup_steps": 20, "logging_steps": 20, "save_steps": 200, "save_total_limit": 1,
    "dataloader_workers": 0, "packing": True, "max_length": 512,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="phivision-demo", help="folder for the model, data, runs and report")
    parser.add_argument("--task", choices=[*TASKS, "all"], default="digits")
    parser.add_argument("--steps", type=int, default=None, help="override the training steps of every task")
    parser.add_argument("--seed", type=int, default=0)


def prepare_data(task: str, data_dir: Path, seed: int) -> tuple[Path, Path]:
    """(train jsonl, eval jsonl) for a task, written once."""
    from phivision.data import digits

    if task == "motion":
        raw = data_dir / "raw"
        if not (data_dir / "ucf101_train.jsonl").is_file():
            digits.write_motion_task(raw, seed=seed, videos_per_class=DEMO_MOTION_VIDEOS_PER_CLASS)
            from phivision.cli.main import main as phivision

            if phivision(["convert", "ucf101", str(raw / "UCF101_subset"), str(data_dir), "--workers", "1"]) != 0:
                raise SystemExit("the UCF-101 conversion of the motion clips failed")
        return data_dir / "ucf101_train.jsonl", data_dir / "ucf101_test.jsonl"
    if not (data_dir / "train.jsonl").is_file():
        writer = digits.write_digits_task if task == "digits" else digits.write_pairs_task
        writer(data_dir, seed=seed)
    return data_dir / "train.jsonl", data_dir / TASK_SETTINGS[task]["eval"]


def evaluate(model_dir: Path, data: Path, description: str = "eval", out: Path | None = None) -> float:
    from phivision.evaluate.evaluation import evaluate_dataset
    from phivision.evaluate.generate import load_for_inference
    from phivision.processing.processor import Phi3VProcessor

    processor = Phi3VProcessor.from_pretrained(model_dir, num_crops=TRAIN_DEFAULTS["num_crops"])
    model = load_for_inference(model_dir, precision="fp32")
    metrics = evaluate_dataset(model, processor, data, batch_size=64, max_new_tokens=6, out_dir=out,
                               description=description)
    return metrics["accuracy"]


def run_task(task: str, out: Path, model_dir: Path, steps: int | None, seed: int) -> dict:
    import yaml

    from phivision.train.config import load_config
    from phivision.train.run import run_training

    started = time.perf_counter()
    train_data, eval_data = prepare_data(task, out / "data" / task, seed)
    run_dir = out / "runs" / task
    config_path = out / "configs" / f"{task}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    values = {"model": str(model_dir), "train_data": str(train_data), "output_dir": str(run_dir),
              **TRAIN_DEFAULTS, "max_steps": steps or TASK_SETTINGS[task]["max_steps"], "seed": seed}
    config_path.write_text(yaml.safe_dump(values, sort_keys=False))
    before = evaluate(model_dir, eval_data, f"{task}: eval before training")
    result = run_training(load_config(config_path))
    after = evaluate(result.model_dir, eval_data, f"{task}: eval after training", run_dir / "eval")
    return {"task": task, "chance": TASK_SETTINGS[task]["chance"], "before": before, "after": after,
            "steps": result.global_step, "seconds": round(time.perf_counter() - started, 1),
            "config": str(config_path), "run": str(run_dir)}


def accuracy_figure(results: list[dict]):
    """Before and after bars per task, with chance marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    positions = range(len(results))
    for offset, key, label in ((-0.2, "before", "before training"), (0.2, "after", "after training")):
        # An edge and a value label keep a 0% bar visible: the random model often scores exactly 0.
        bars = axis.bar([p + offset for p in positions], [r[key] for r in results], 0.4, label=label,
                        edgecolor="black", linewidth=0.8)
        axis.bar_label(bars, [f"{r[key]:.0%}" for r in results], fontsize=8, padding=2)
    axis.scatter(list(positions), [r["chance"] for r in results], marker="_", s=600, color="black", label="chance")
    axis.set_xticks(list(positions), [r["task"] for r in results])
    axis.set_ylim(0, 1.22)
    axis.set_ylabel("held-out accuracy")
    axis.legend(loc="upper center", ncol=3, fontsize=8)
    figure.tight_layout()
    return figure


def write_report(out: Path, results: list[dict]) -> Path:
    accuracy_figure(results).savefig(out / "accuracy.png", dpi=110)
    lines = ["# phivision demo", "", results_table(results), "", "![accuracy](accuracy.png)", ""]
    for result in results:
        config, run = (Path(result[key]).relative_to(out).as_posix() for key in ("config", "run"))
        lines.append(f"- `{result['task']}`: config [{config}]({config}), run [{run}]({run}): "
                     f"[report]({run}/report.md), [loss curve]({run}/loss.png), "
                     f"[predictions]({run}/eval/predictions.jsonl), [confusion matrix]({run}/eval/confusion_matrix.png)")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return path


def results_table(results: list[dict]) -> str:
    rows = ["| task | chance | before | after | steps | time |", "|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['task']} | {r['chance']:.0%} | {r['before']:.1%} | {r['after']:.1%} | "
                    f"{r['steps']} | {r['seconds']:.0f} s |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    from phivision.processing.folder import write_random_model

    out = Path(args.out)
    model_dir = out / "model"
    if not (model_dir / "model.safetensors").is_file():
        write_random_model(model_dir, preset="tiny", num_crops=TRAIN_DEFAULTS["num_crops"], seed=args.seed)
    tasks = TASKS if args.task == "all" else (args.task,)
    results = [run_task(task, out, model_dir, args.steps, args.seed) for task in tasks]
    report = write_report(out, results)
    print("\n" + results_table(results))
    print(f"\nreport: {report}")
    return 0
