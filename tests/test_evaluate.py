"""Evaluation, prediction and export: `phivision eval`, `predict` and `export` on tiny trained runs."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from phivision.cli.main import main
from phivision.cli.predict import default_num_crops
from phivision.data.digits import DIGIT_WORDS, DIGITS_QUESTION, write_digits_task
from phivision.errors import PhivisionError
from phivision.evaluate import generate as generate_module
from phivision.evaluate.export import TOLERANCE, adapted_model, check_sample, export_run, logits_on, read_run
from phivision.evaluate.generate import generate, load_for_inference
from phivision.evaluate.metrics import anls, confusion_matrix, format_confusion_matrix
from phivision.model.weights import load_model
from phivision.processing.images import load_image
from phivision.processing.processor import ChatTurn, Phi3VProcessor
from phivision.processing.tokenizer import Phi3Tokenizer
from phivision.processing.video import load_frames
from phivision.train.config import load_config
from phivision.train.run import run_training

RECORD_KEYS = {"id", "prompt", "prediction", "reference", "score"}


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """64 real training digits, 12 test digits and 7 more (an odd count, for two processes)."""
    root = tmp_path_factory.mktemp("eval-digits")
    write_digits_task(root)
    train = (root / "train.jsonl").read_text().splitlines()
    test = (root / "test.jsonl").read_text().splitlines()
    (root / "small_train.jsonl").write_text("\n".join(train[:64]) + "\n")
    (root / "lora_train.jsonl").write_text("\n".join(train[:8]) + "\n")
    (root / "small_test.jsonl").write_text("\n".join(test[:12]) + "\n")
    (root / "odd_test.jsonl").write_text("\n".join(test[12:19]) + "\n")
    return root


def train_run(model_dir, digits: Path, out: Path, **overrides):
    values = {
        "model": str(model_dir), "train_data": str(digits / "small_train.jsonl"), "output_dir": str(out),
        "method": "full", "num_crops": 1, "global_batch_size": 8, "per_device_batch_size": 8,
        "max_steps": 40, "save_steps": 1000, "logging_steps": 10, "learning_rate": 1e-2,
        "lr_scheduler": "constant_with_warmup", "warmup_steps": 0, "dataloader_workers": 0, "lora_rank": 8,
    }
    values.update(overrides)
    return run_training(load_config(None, base=values))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, digits, tmp_path_factory):
    """A full fine-tune that has learned the answer format: a digit word, then `<|end|>`."""
    return train_run(tiny_model_dir, digits, tmp_path_factory.mktemp("full-run") / "run")


@pytest.fixture(scope="module")
def trained_model(trained):
    return load_for_inference(trained.model_dir, precision="fp32")


@pytest.fixture(scope="module")
def digit_eval(trained, digits, tmp_path_factory):
    """`phivision eval` on 12 test digits: (out folder, stdout)."""
    out = tmp_path_factory.mktemp("digit-eval")
    stdout = run_cli(["eval", "--model", str(trained.model_dir), "--data", str(digits / "small_test.jsonl"),
                      "--out", str(out), "--batch-size", "5", "--max-new-tokens", "8"])
    return out, stdout


def run_cli(argv: list[str]) -> str:
    """Run the CLI in this process; stdout, asserting exit status 0."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(argv)
    assert status == 0, buffer.getvalue()
    return buffer.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


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
    assert matrix.sum() == 12 and names[: len(set(references))] == sorted(set(references))
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


def write_mixed_data(digits: Path, folder: Path) -> Path:
    """Prompts of different lengths with 0, 1 and 2 images of different shapes (so crop counts differ)."""
    images = folder / "images"
    images.mkdir(parents=True)
    shapes = {"square.png": (40, 40), "wide.png": (120, 40), "tall.png": (36, 90), "big.png": (70, 70)}
    for position, (name, size) in enumerate(shapes.items()):
        scan = Image.open(digits / "images" / "test" / f"{position:04d}.png").convert("RGB")
        scan.resize(size, Image.Resampling.NEAREST).save(images / name)
    question = DIGITS_QUESTION
    samples = [
        ("text-short", [], "Which digit?"),
        ("one-square", ["square.png"], question),
        ("two-wide-tall", ["wide.png", "tall.png"], "Is the first digit larger than the second?"),
        ("text-long", [], "Please read the following carefully and then tell me which digit you would pick: "
                           "zero, one, two, three, four, five, six, seven, eight or nine?"),
        ("one-wide", ["wide.png"], "Digit?"),
        ("two-tagged", ["big.png", "square.png"], "<|image_1|> and <|image_2|>: " + question),
        ("one-tall", ["tall.png"], question),
    ]
    records = [{"id": sample_id, "conversations": [{"images": paths, "user": user, "assistant": "zero"}]}
               for sample_id, paths, user in samples]
    records.append({"id": "two-turns", "conversations": [
        {"images": ["big.png"], "user": question, "assistant": "four"},
        {"user": "And again?", "assistant": "four"},
    ]})
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


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


# ---- predict -------------------------------------------------------------------------------


def test_default_num_crops_follows_the_official_guidance():
    assert [default_num_crops(n) for n in (1, 2, 3, 8)] == [16, 4, 4, 4]


def write_video(path: Path, num_frames: int = 10, size: int = 32) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(num_frames):
            pixels = np.zeros((size, size, 3), np.uint8)
            pixels[:, 2 * index : 2 * index + 8] = 255  # a bar sliding right
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture()
def predict_spy(monkeypatch):
    """Records what `phivision predict` hands to `generate` and what it got back."""
    calls = []
    real = generate_module.generate

    def spy(model, processor, prompts, max_new_tokens=64, streamer=None):
        answers = real(model, processor, prompts, max_new_tokens, streamer)
        calls.append({"num_crops": processor.num_crops, "prompts": prompts, "answers": answers,
                      "max_new_tokens": max_new_tokens})
        return answers

    monkeypatch.setattr(generate_module, "generate", spy)
    return calls


@pytest.mark.parametrize("media", ["one image", "two images", "video", "explicit crops"])
def test_predict_prints_the_answer(trained, trained_model, digits, tmp_path, capsys, predict_spy, media):
    first, second = digits / "images" / "test" / "0003.png", digits / "images" / "test" / "0004.png"
    video = write_video(tmp_path / "clip.avi")
    argv = ["predict", "--model", str(trained.model_dir), "--prompt", DIGITS_QUESTION, "--max-new-tokens", "12"]
    if media == "one image":
        argv += ["--image", str(first)]
        images, crops = [load_image(first)], 16
    elif media == "two images":
        argv += ["--image", str(first), "--image", str(second)]
        images, crops = [load_image(first), load_image(second)], 4
    elif media == "video":
        argv += ["--video", str(video)]
        images, crops = load_frames(video, 8), 4
    else:
        argv += ["--image", str(first), "--num-crops", "2"]
        images, crops = [load_image(first)], 2
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out

    [call] = predict_spy
    assert call["num_crops"] == crops and call["max_new_tokens"] == 12
    processor = Phi3VProcessor.from_pretrained(trained.model_dir, num_crops=crops)
    expected_prompt = processor.encode_conversation("prompt", [ChatTurn(DIGITS_QUESTION, None, images)],
                                                    for_generation=True)
    [prompt] = call["prompts"]
    assert prompt.num_images == len(images)
    assert torch.equal(prompt.input_ids, expected_prompt.input_ids)
    assert torch.equal(prompt.pixel_values, expected_prompt.pixel_values)
    expected = generate(trained_model, processor, [expected_prompt], max_new_tokens=12)
    assert call["answers"] == expected
    assert printed.strip() == expected[0] and printed.endswith("\n")
    if media == "one image":
        assert prompt.pixel_values.shape[1] == 17  # 16 crops and the global view


# ---- export --------------------------------------------------------------------------------


def adapter_run(tiny_model_dir, digits: Path, out: Path, method: str):
    result = train_run(tiny_model_dir, digits, out, method=method, train_data=str(digits / "lora_train.jsonl"),
                       max_steps=2, global_batch_size=4, per_device_batch_size=4, learning_rate=2e-3)
    adapter = load_file(result.model_dir / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and tensor.abs().max() > 0 for name, tensor in adapter.items())
    return result


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, digits, tmp_path_factory):
    return adapter_run(tiny_model_dir, digits, tmp_path_factory.mktemp("lora") / "run", "lora")


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, digits, tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return adapter_run(tiny_model_dir, digits, tmp_path_factory.mktemp("qlora") / "run", "qlora")


@pytest.mark.parametrize("run_fixture", ["lora_run", "qlora_run"])
def test_export_merges_the_adapter_into_a_full_checkpoint(run_fixture, request, tiny_model_dir, tmp_path, capsys):
    run_dir, out = request.getfixturevalue(run_fixture).output_dir, tmp_path / "merged"
    capsys.readouterr()
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    base, merged = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert merged.keys() == base.keys()
    assert {tensor.dtype for tensor in merged.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
    reloaded = load_model(out, precision="fp32").eval()

    run = read_run(run_dir)
    processor = Phi3VProcessor.from_pretrained(out)
    sample = check_sample(run, processor)
    expected = logits_on(adapted_model(run_dir, run), processor, sample)
    difference = float((logits_on(reloaded, processor, sample) - expected).abs().max())
    assert difference <= TOLERANCE["bf16"] * float(expected.abs().max())
    # The adapter matters: the plain base is further from the adapted model than the export is.
    base_model = load_model(tiny_model_dir, precision="fp32").eval()
    assert float((logits_on(base_model, processor, sample) - expected).abs().max()) > 10 * difference
    match = re.search(r"differ from the adapter-applied model by at most (\S+)\n", printed)
    assert match and match.group(1) == f"{difference:.3g}", printed
    assert f"exported {run_dir} to {out} (bf16)" in printed


def test_lora_export_in_fp32_matches_the_adapter_closely(lora_run, tiny_model_dir, digits, tmp_path):
    difference = export_run(lora_run.output_dir, tmp_path / "fp32", precision="fp32")
    assert difference < 1e-4
    merged = load_file(tmp_path / "fp32" / "model.safetensors")
    assert {tensor.dtype for tensor in merged.values()} == {torch.float32}
    # Evaluating the base with the adapter applied, or the merged export, gives the same answers.
    data = write_mixed_data(digits, tmp_path / "data")
    common = ["--data", str(data), "--limit", "4", "--max-new-tokens", "4", "--num-crops", "1"]
    run_cli(["eval", "--model", str(tiny_model_dir), "--adapter", str(lora_run.model_dir), *common,
             "--out", str(tmp_path / "adapter")])
    run_cli(["eval", "--model", str(tmp_path / "fp32"), *common, "--out", str(tmp_path / "merged")])
    adapter, merged = (read_jsonl(tmp_path / name / "predictions.jsonl") for name in ("adapter", "merged"))
    assert adapter == merged and any(record["prediction"] for record in adapter)


def test_export_of_a_full_run_is_a_clear_error(trained, tmp_path, capsys):
    with pytest.raises(PhivisionError, match="holds no LoRA adapter: only lora/qlora runs need exporting"):
        export_run(trained.output_dir, tmp_path / "out")
    capsys.readouterr()
    assert main(["export", "--run", str(trained.output_dir), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("phivision export: error: ") and "holds no LoRA adapter" in error
    assert "Traceback" not in error and not (tmp_path / "out").exists()


def test_export_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    with pytest.raises(PhivisionError, match="no-such-run"):
        export_run(missing, tmp_path / "out")
    capsys.readouterr()
    assert main(["export", "--run", str(missing), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("phivision export: error: ") and str(missing) in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ---- two processes -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
