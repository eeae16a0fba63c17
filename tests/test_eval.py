"""Evaluation: `phivision eval` on tiny trained runs — metrics files, batching, generation stopping, two processes.

The trained run and its digits data are session fixtures in conftest.py, shared with test_export_predict.py.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, read_jsonl, run_cli, write_mixed_data
from PIL import Image

from phivision.data.digits import DIGIT_WORDS, DIGITS_QUESTION
from phivision.evaluate import generate as generate_module
from phivision.evaluate.generate import generate
from phivision.evaluate.metrics import anls, confusion_matrix, format_confusion_matrix
from phivision.processing.images import load_image
from phivision.processing.processor import ChatTurn, Phi3VProcessor
from phivision.processing.tokenizer import Phi3Tokenizer

RECORD_KEYS = {"id", "prompt", "prediction", "reference", "score"}


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_eval(trained, digits, tmp_path_factory):
    """`phivision eval` on 12 test digits: (out folder, stdout)."""
    out = tmp_path_factory.mktemp("digit-eval")
    stdout = run_cli(["eval", "--model", str(trained.model_dir), "--data", str(digits / "small_test.jsonl"),
                      "--out", str(out), "--batch-size", "5", "--max-new-tokens", "8"])
    return out, stdout


def jsonl_ids(path: Path) -> list[str]:
    return [record["id"] for record in read_jsonl(path)]


def labels_of(path: Path) -> list[str]:
    return [record["conversations"][-1]["assistant"] for record in read_jsonl(path)]


# ---- eval on the digits classification ------------------------------------------------------


def test_eval_writes_scored_predictions_and_metrics(digit_eval, digits):
    out, stdout = digit_eval
    data = digits / "small_test.jsonl"
    records = read_jsonl(out / "predictions.jsonl")
    assert [set(record) for record in records] == [RECORD_KEYS] * 12
    assert [r["id"] for r in records] == jsonl_ids(data)
    assert [r["reference"] for r in records] == labels_of(data)
    assert all(r["prompt"] == DIGITS_QUESTION for r in records)
    # The trained model answers with digit words, so the scores are not all trivially zero.
    predictions = [r["prediction"] for r in records]
    assert all(prediction in DIGIT_WORDS for prediction in predictions), predictions
    assert [r["score"] for r in records] == [float(r["prediction"] == r["reference"]) for r in records]

    metrics = json.loads((out / "metrics.json").read_text())
    mean = sum(r["score"] for r in records) / len(records)
    assert metrics["metric"] == "accuracy" and metrics["samples"] == 12
    assert metrics["accuracy"] == pytest.approx(mean, abs=1e-12)
    expected_per_class = {}
    for label in sorted(set(labels_of(data))):
        scores = [r["score"] for r in records if r["reference"] == label]
        expected_per_class[label] = sum(scores) / len(scores)
    assert metrics["per_class_accuracy"] == pytest.approx(expected_per_class)
    assert f"accuracy: {mean:.4f} on 12 samples" in stdout


def test_eval_writes_the_confusion_matrix_as_text_and_png(digit_eval, digits):
    out, _ = digit_eval
    records = read_jsonl(out / "predictions.jsonl")
    references = [r["reference"] for r in records]
    names, matrix = confusion_matrix([r["prediction"] for r in records], references)
    numbers = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert matrix.sum() == 12 and names[: len(set(references))] == sorted(set(references), key=numbers.index)
    assert (out / "confusion_matrix.txt").read_text() == format_confusion_matrix(names, matrix) + "\n"
    # Rows are references: each row's total is the number of samples with that label.
    rows = (out / "confusion_matrix.txt").read_text().splitlines()[1:]
    for label, row in zip(names, rows):
        assert sum(map(int, row.split()[1:])) == references.count(label)
    with Image.open(out / "confusion_matrix.png") as png:
        assert png.format == "PNG" and min(png.size) >= 100


def test_eval_limit_scores_only_the_first_samples(trained, digits, tmp_path):
    data = digits / "small_test.jsonl"
    stdout = run_cli(["eval", "--model", str(trained.model_dir), "--data", str(data), "--out", str(tmp_path),
                      "--limit", "3", "--max-new-tokens", "8"])
    assert jsonl_ids(tmp_path / "predictions.jsonl") == jsonl_ids(data)[:3]
    assert json.loads((tmp_path / "metrics.json").read_text())["samples"] == 3
    assert "on 3 samples" in stdout


def write_docvqa_like(digits: Path, path: Path, predictions: list[str]) -> list[list[str]]:
    """Digit images with several reference answers each; one answer is one edit away from the prediction."""
    answers = [[f"{prediction}x", "no match at all"] for prediction in predictions[:4]]
    answers.append(["something else", "and another"])  # scores 0
    answers.append([predictions[5].upper() + "."])  # exact after normalisation: 1
    lines = (digits / "small_test.jsonl").read_text().splitlines()
    records = []
    for line, sample_answers in zip(lines, answers):
        record = json.loads(line)
        record["source"] = "docvqa"
        record["answers"] = sample_answers
        record["conversations"][0]["assistant"] = sample_answers[0]
        records.append(json.dumps(record))
    path.write_text("\n".join(records) + "\n")
    return answers


def test_eval_picks_anls_for_data_with_several_answers(digit_eval, digits, trained, tmp_path):
    predictions = [r["prediction"] for r in read_jsonl(digit_eval[0] / "predictions.jsonl")]
    data = tmp_path / "docvqa.jsonl"
    answers = write_docvqa_like(digits, data, predictions)
    argv = ["eval", "--model", str(trained.model_dir), "--data", str(data), "--image-root", str(digits / "images"),
            "--max-new-tokens", "8"]
    stdout = run_cli([*argv, "--out", str(tmp_path / "auto")])
    records = read_jsonl(tmp_path / "auto" / "predictions.jsonl")
    assert [r["prediction"] for r in records] == predictions[:6]
    expected = [1 - 1 / (len(p) + 1) for p in predictions[:4]] + [0.0, 1.0]
    assert [r["score"] for r in records] == pytest.approx(expected)
    assert [r["score"] for r in records] == [anls(r["prediction"], a) for r, a in zip(records, answers)]
    assert [r["reference"] for r in records] == [a if len(a) > 1 else a[0] for a in answers]
    metrics = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert metrics == {"metric": "anls", "anls": pytest.approx(sum(expected) / 6), "samples": 6}
    assert "anls: " in stdout and not (tmp_path / "auto" / "confusion_matrix.txt").exists()

    run_cli([*argv, "--out", str(tmp_path / "anls"), "--metric", "anls"])
    assert (tmp_path / "anls" / "metrics.json").read_text() == (tmp_path / "auto" / "metrics.json").read_text()
    run_cli([*argv, "--out", str(tmp_path / "exact"), "--metric", "accuracy"])
    exact = json.loads((tmp_path / "exact" / "metrics.json").read_text())
    assert exact["metric"] == "accuracy" and exact["accuracy"] == pytest.approx(1 / 6)


# ---- batching ------------------------------------------------------------------------------



def test_batched_predictions_equal_one_by_one(tiny_model_dir, digits, tmp_path, monkeypatch):
    """On the random model: long, varied continuations in every row, the hardest case for padding."""
    data = write_mixed_data(digits, tmp_path / "data")
    batch_sizes = []
    real = generate_module.generate

    def spy(model, processor, prompts, max_new_tokens=64, streamer=None):
        batch_sizes.append(len(prompts))
        return real(model, processor, prompts, max_new_tokens, streamer)

    monkeypatch.setattr(generate_module, "generate", spy)
    predictions = {}
    for size in (8, 1):
        out = tmp_path / f"batch-{size}"
        run_cli(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                 "--batch-size", str(size), "--num-crops", "4", "--max-new-tokens", "8"])
        predictions[size] = [(r["id"], r["prediction"]) for r in read_jsonl(out / "predictions.jsonl")]
    assert batch_sizes == [8] + [1] * 8
    assert predictions[8] == predictions[1]
    assert len({prediction for _, prediction in predictions[1]}) == 8  # a different answer for every prompt


def test_generate_batches_mixed_prompts_like_single_ones(tiny_model, tiny_processor, digits):
    """The same at the function level: 0, 1 and 2 images of different crop counts in one batch."""
    image = load_image(digits / "images" / "test" / "0001.png")
    wide = image.resize((100, 40))
    prompts = [
        tiny_processor.encode_conversation("a", [ChatTurn("Hello there, tell me something long please.")],
                                           for_generation=True),
        tiny_processor.encode_conversation("b", [ChatTurn(DIGITS_QUESTION, None, [image])], for_generation=True),
        tiny_processor.encode_conversation("c", [ChatTurn("Compare.", None, [wide, image])], for_generation=True),
    ]
    assert len({len(prompt) for prompt in prompts}) == 3
    batched = generate(tiny_model, tiny_processor, prompts, max_new_tokens=10)
    assert batched == [generate(tiny_model, tiny_processor, [prompt], max_new_tokens=10)[0] for prompt in prompts]
    assert len(set(batched)) == 3 and all(batched)


# ---- stopping ------------------------------------------------------------------------------


def test_stop_ids_are_end_and_endoftext():
    tokenizer = Phi3Tokenizer.bundled()
    assert tokenizer.stop_ids == [tokenizer.tokenizer.token_to_id("<|end|>"),
                                  tokenizer.tokenizer.token_to_id("<|endoftext|>")] == [32007, 32000]


def scripted(model, scripts: list[list[int]]):
    """The real model and generation loop, with each row's next token forced from a script."""
    original = model.forward
    step = {"n": 0}

    @functools.wraps(original)  # generate() checks its kwargs against the forward signature
    def forward(*args, **kwargs):
        output = original(*args, **kwargs)
        logits = torch.full_like(output.logits[:, -1:], -1e4)
        for row, script in enumerate(scripts):
            logits[row, 0, script[min(step["n"], len(script) - 1)]] = 1e4
        step["n"] += 1
        output.logits = logits
        return output

    model.forward = forward
    return model


def test_generation_stops_at_end_and_endoftext_per_row(tiny_model, tiny_processor):
    tokenizer = tiny_processor.tokenizer
    four, five, six, seven = (tokenizer.tokenizer.token_to_id(f"▁{word}")
                              for word in ("four", "five", "six", "seven"))
    assert tokenizer.decode([four, five]) == "four five"
    scripts = [
        [four, tokenizer.end_id, seven, seven, seven, seven],  # stops after one word at <|end|>
        [five, six, tokenizer.endoftext_id, seven, seven, seven],  # two words, then <|endoftext|>
        [seven],  # never stops: runs to max_new_tokens
    ]
    model = scripted(tiny_model, scripts)
    prompts = [tiny_processor.encode_conversation(str(k), [ChatTurn("Count.")], for_generation=True)
               for k in range(3)]
    assert generate(model, tiny_processor, prompts, max_new_tokens=5) == ["four", "five six", "seven " * 4 + "seven"]


def test_trained_model_ends_its_answer_with_end(trained_model, trained, digits, monkeypatch):
    processor = Phi3VProcessor.from_pretrained(trained.model_dir)
    outputs = []
    real_generate = trained_model.generate

    def keep(**kwargs):
        outputs.append(real_generate(**kwargs))
        return outputs[-1]

    monkeypatch.setattr(trained_model, "generate", keep)
    image = load_image(digits / "images" / "test" / "0002.png")
    prompt = processor.encode_conversation("x", [ChatTurn(DIGITS_QUESTION, None, [image])], for_generation=True)
    answer = generate(trained_model, processor, [prompt], max_new_tokens=12)[0]
    new_tokens = outputs[0][0, len(prompt):].tolist()
    assert answer in DIGIT_WORDS
    assert new_tokens[-1] == processor.tokenizer.end_id and len(new_tokens) < 12
    assert processor.tokenizer.decode(new_tokens[:-1]).strip() == answer


# ---- two processes -------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_eval_matches_one_process(trained, digits, tmp_path):
    data = digits / "odd_test.jsonl"
    common = ["--model", str(trained.model_dir), "--data", str(data), "--batch-size", "2", "--max-new-tokens", "8"]
    run_cli(["eval", *common, "--out", str(tmp_path / "single")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "phivision.cli.main", "eval", *common, "--out", str(tmp_path / "ddp")]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    single, ddp = (read_jsonl(tmp_path / name / "predictions.jsonl") for name in ("single", "ddp"))
    assert [r["id"] for r in ddp] == jsonl_ids(data) and len(ddp) == 7
    assert ddp == single
    assert (tmp_path / "ddp" / "metrics.json").read_text() == (tmp_path / "single" / "metrics.json").read_text()
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["samples"] == 7
    assert completed.stdout.count("on 7 samples") == 1  # only rank 0 reports


def test_eval_with_an_adapter_uses_the_crops_it_was_trained_with(tmp_path, tiny_model_dir):
    from phivision.evaluate.generate import inference_processor

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    (adapter / "preprocessor_config.json").write_text(json.dumps({**config, "num_crops": 9}))
    assert inference_processor(tiny_model_dir, adapter).num_crops == 9
    assert inference_processor(tiny_model_dir, adapter, num_crops=2).num_crops == 2
    assert inference_processor(tiny_model_dir).num_crops == config["num_crops"]


@pytest.mark.parametrize("command, flag", [("eval", "--batch-size"), ("eval", "--limit"), ("eval", "--max-new-tokens"),
                                           ("predict", "--num-crops"), ("predict", "--frames"),
                                           ("bench", "--steps"), ("bench", "--batch-size")])
def test_counts_below_one_are_a_usage_error(command, flag, tmp_path, capsys):
    from phivision.cli.main import main

    required = {"eval": ["--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl")],
                "predict": ["--model", str(tmp_path), "--prompt", "hi"], "bench": []}[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *required, flag, "0"])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("samples, world", [(17, 2), (16, 4), (2, 3), (0, 2)])
def test_every_rank_gets_as_many_samples_and_all_are_covered(samples, world):
    from phivision.evaluate.evaluation import shard

    positions = list(range(samples))
    shards = [shard(positions, rank, world) for rank in range(world)]
    assert len({len(part) for part in shards}) == 1  # the same number of generate calls on every rank
    assert set().union(*shards) == set(positions)
    assert len(shards[0]) == -(-samples // world)
