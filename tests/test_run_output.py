"""What a user sees during and after a run: the progress bar, report.md, the plots, the model card, quiet libraries."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from phivision.train.config import load_config

# ---- the progress bar ----------------------------------------------------------------------------


def test_bar_keeps_training_figures_after_an_evaluation_and_prints_one_line_per_evaluation(tmp_path, capsys):
    from phivision.train.callbacks import ProgressBarCallback

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control, bar = TrainerState(max_steps=10), TrainerControl(), ProgressBarCallback()
    state.global_step = 0
    bar.on_train_begin(args, state, control)
    state.global_step = 5
    bar.on_step_end(args, state, control)
    bar.on_log(args, state, control, logs={"loss": 2.5, "learning_rate": 1e-4, "images_per_second": 3.0,
                                           "tokens_per_second": 900.0})
    bar.on_log(args, state, control, logs={"eval_loss": 2.25, "eval_runtime": 0.12,
                                           "eval_samples_per_second": 125.0, "eval_steps_per_second": 15.6})
    bar.on_log(args, state, control, logs={"eval_accuracy": 0.5})
    assert bar.bar.postfix == "loss=2.5, lr=0.0001, img/s=3, tok/s=900"
    bar.on_step_begin(args, state, control)
    state.global_step = 10
    bar.on_log(args, state, control, logs={"eval_loss": 2.0, "eval_runtime": 0.1})
    bar.on_train_end(args, state, control)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert lines == ["step 5: eval loss 2.2500, accuracy 0.5000", "step 10: eval loss 2.0000"]


# ---- report.md and the curves ----------------------------------------------------------------------


def one_step_config(tmp_path: Path):
    return load_config(None, base={"model": str(tmp_path / "base"), "train_data": str(tmp_path / "train.jsonl"),
                                   "output_dir": str(tmp_path / "run"), "eval_data": str(tmp_path / "eval.jsonl"),
                                   "eval_steps": 1})


def write_records(run: Path, records: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


RECORDS = [
    {"step": 1, "loss": 3.0, "learning_rate": 1e-4, "images_per_second": 2.0},
    {"step": 1, "eval_loss": 2.5, "eval_runtime": 0.2, "eval_samples_per_second": 40.0, "eval_steps_per_second": 5.0},
    {"step": 1, "eval_accuracy": 0.0},
    {"step": 2, "loss": 2.0, "learning_rate": 1e-4, "images_per_second": 2.0},
    {"step": 2, "eval_loss": 2.0, "eval_runtime": 0.2},
    {"step": 2, "eval_accuracy": 0.0},
]


def test_report_shows_real_metrics_the_precision_used_and_singular_counts(tmp_path):
    from phivision.train.report import write_report

    config = one_step_config(tmp_path)
    run = Path(config.output_dir)
    write_records(run, RECORDS)
    (run / "model").mkdir()
    text = write_report(run, config, steps=1, samples=1, skipped=0).read_text()
    assert "precision fp32" in text and "precision auto" not in text  # no GPU here: auto is fp32
    assert "- 1 optimiser step," in text and "- data " in text and ": 1 sample\n" in text
    assert "(last of 2 evaluations)" in text
    assert "runtime" not in text and "per_second" not in text
    assert "[model/](model/)" in text and "![loss and task metric](loss.png)" in text
    assert (run / "loss.png").is_file()


def test_curves_put_the_task_metric_on_its_own_zero_to_one_panel(tmp_path):
    from phivision.train.report import curves_figure

    figure = curves_figure(RECORDS)
    loss_axis, metric_axis = figure.axes
    assert [line.get_label() for line in loss_axis.get_lines()] == ["train loss", "eval loss"]
    assert [line.get_label() for line in metric_axis.get_lines()] == ["accuracy"]
    low, high = metric_axis.get_ylim()
    assert low < 0 < 1 < high < 1.1  # a metric stuck at 0 still reads on a 0..1 axis
    assert metric_axis.get_legend() is not None and loss_axis.get_legend() is not None
    assert metric_axis.get_xlabel() == "optimiser step"
    assert len(curves_figure(RECORDS[:1] + RECORDS[3:4]).axes) == 1  # no evaluation, no metric panel


def test_confusion_matrix_orders_numbers_numerically_and_other_labels_as_in_the_data():
    from phivision.evaluate.metrics import confusion_matrix

    assert confusion_matrix(["10", "9", "2"], ["10", "9", "2"])[0] == ["2", "9", "10"]
    assert confusion_matrix(["x"] * 3, ["nine", "two", "Ten"])[0][:3] == ["two", "nine", "Ten"]
    assert confusion_matrix(["cat", "dog", "ant"], ["cat", "dog", "ant"])[0] == ["cat", "dog", "ant"]


def test_demo_plot_shows_a_before_bar_at_zero_percent():
    from phivision.cli.demo import accuracy_figure

    results = [{"task": "digits", "chance": 0.1, "before": 0.0, "after": 0.964}]
    axis = accuracy_figure(results).axes[0]
    labels = [text.get_text() for text in axis.texts]
    assert labels == ["0%", "96%"]
    before_bar = axis.containers[0][0]
    assert before_bar.get_height() == 0 and before_bar.get_linewidth() > 0


def test_demo_report_links_relative_to_its_folder(tmp_path):
    from phivision.cli.demo import write_report

    out = tmp_path / "demo"
    out.mkdir()
    results = [{"task": "digits", "chance": 0.1, "before": 0.0, "after": 0.5, "steps": 1, "seconds": 1.0,
                "config": str(out / "configs" / "digits.yaml"), "run": str(out / "runs" / "digits")}]
    text = write_report(out, results).read_text()
    assert "[configs/digits.yaml](configs/digits.yaml)" in text and "[report](runs/digits/report.md)" in text
    assert str(tmp_path) not in text


# ---- a finished run's folder ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, digits, tmp_path_factory):
    from helpers import train_run

    run = tmp_path_factory.mktemp("lora-run") / "run"
    return train_run(tiny_model_dir, digits, run, method="lora", max_steps=2, save_steps=1, logging_steps=1,
                     report_to=["tensorboard"])


def test_finished_run_leaves_no_staging_folder(lora_run):
    assert sorted(p.name for p in lora_run.output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (lora_run.output_dir / ".staging").exists()


def test_lora_model_folder_has_a_real_model_card(lora_run, tiny_model_dir, digits):
    card = (lora_run.model_dir / "README.md").read_text()
    assert card.startswith("---\nbase_model: ")
    assert "library_name: peft" in card and "[More Information Needed]" not in card  # peft's template
    assert f"base model `{tiny_model_dir}`" in card and "method **lora (rank 8, alpha 16)**" in card
    assert f"data `{digits / 'small_train.jsonl'}`: 64 samples" in card and "2 optimiser steps" in card
    assert "train loss " in card and "- command: `" in card
    assert f"--adapter {lora_run.model_dir}" in card


def tensorboard_tags(event_file: Path) -> set[str]:
    """Scalar tags in a TFRecord event file (length, crc, Event proto, crc per record)."""
    from tensorboardX.proto import event_pb2

    payload, tags, offset = event_file.read_bytes(), set(), 0
    while offset < len(payload):
        (length,) = struct.unpack("<Q", payload[offset:offset + 8])
        event = event_pb2.Event.FromString(payload[offset + 12:offset + 12 + length])
        tags.update(value.tag for value in event.summary.value)
        offset += 12 + length + 4
    return tags


def test_report_to_tensorboard_writes_event_files(lora_run):
    pytest.importorskip("tensorboardX")
    event_files = list((lora_run.output_dir / "runs").glob("*/events.out.tfevents.*"))
    assert len(event_files) == 1
    assert {"train/loss", "train/learning_rate"} <= tensorboard_tags(event_files[0])


def test_a_logger_that_is_not_installed_is_one_line(tmp_path, tiny_model_dir, digits):
    from phivision.errors import PhivisionError
    from phivision.train.run import check_reporters

    if __import__("importlib").util.find_spec("wandb") is None:
        with pytest.raises(PhivisionError, match=r"^report_to: wandb is not installed here: pip install wandb"):
            check_reporters(["wandb"])
    with pytest.raises(PhivisionError, match="unknown logger 'tensorbored'"):
        check_reporters(["tensorbored"])


# ---- defaults and the benchmark's tables ------------------------------------------------------------


def test_dataloader_workers_follow_the_cores_per_process(tmp_path, monkeypatch):
    config = one_step_config(tmp_path)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert config.resolved_dataloader_workers == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert config.resolved_dataloader_workers == 4
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert config.resolved_dataloader_workers == 0
    config.dataloader_workers = 3
    assert config.resolved_dataloader_workers == 3


def test_bench_all_methods_include_projector_only_and_figures_have_fixed_decimals():
    from phivision.bench.report import methods_table
    from phivision.cli.bench import METHODS

    assert "projector_only" in METHODS
    result = {"gradient_checkpointing": False, "images_per_s": 2.3149, "tokens_per_s": 1234.56,
              "step_time_s": 3.45678, "step_time_min_s": 3.4, "step_time_max_s": 3.5,
              "peak_memory_bytes": 515 * 2**20, "peak_rss_bytes": 3 * 2**30, "flops_per_step": 1.234e12,
              "peak_matmul_flops_per_s": 2.5e11, "mfu": 0.4661, "losses": [10.5, 9.25]}
    row = methods_table({"full": result, "qlora": {**result, "images_per_s": 115.0}}, {}).splitlines()
    assert "    2.31      1235  3.457 (3.400-3.500)" in row[1]
    assert "  115.00 " in row[2]


# ---- library chatter ---------------------------------------------------------------------------------


def test_pil_decompression_bomb_warning_is_one_phivision_line(tmp_path):
    from PIL import Image

    Image.new("RGB", (200, 200)).save(tmp_path / "big.png")
    script = ("from phivision.quiet import quiet_libraries; quiet_libraries()\n"
              "from PIL import Image; Image.MAX_IMAGE_PIXELS = 30000\n"
              f"Image.open({str(tmp_path / 'big.png')!r}).load()\n")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.splitlines() == [
        "phivision: warning: Image size (40000 pixels) exceeds limit of 30000 pixels, "
        "could be decompression bomb DOS attack."
    ]


def test_stdout_filter_drops_deepspeed_build_lines_only(capsys):
    from phivision.quiet import DEEPSPEED_BUILD_LINE, stdout_without

    with stdout_without(DEEPSPEED_BUILD_LINE):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("step 1: eval loss 2.0000")
        print("partial", end="")
    assert capsys.readouterr().out == "step 1: eval loss 2.0000\npartial"
