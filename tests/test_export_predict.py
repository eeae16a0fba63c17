"""Prediction and export: `phivision predict` and `export` on tiny trained runs.

The trained run and its digits data are session fixtures in conftest.py, shared with test_eval.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from helpers import read_jsonl, run_cli, train_run, write_mixed_data
from safetensors.torch import load_file

from phivision.cli.main import main
from phivision.data.digits import DIGITS_QUESTION
from phivision.errors import PhivisionError
from phivision.evaluate import generate as generate_module
from phivision.evaluate.export import TOLERANCE, adapted_model, check_sample, export_run, logits_on, read_run
from phivision.evaluate.generate import generate
from phivision.model.weights import load_model
from phivision.processing.images import load_image
from phivision.processing.processor import ChatTurn, Phi3VProcessor
from phivision.processing.video import load_frames


# ---- predict -------------------------------------------------------------------------------


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
    trained_crops = json.loads((trained.model_dir / "preprocessor_config.json").read_text())["num_crops"]
    if media == "one image":
        argv += ["--image", str(first)]
        images, crops = [load_image(first)], trained_crops
    elif media == "two images":
        argv += ["--image", str(first), "--image", str(second)]
        images, crops = [load_image(first), load_image(second)], trained_crops
    elif media == "video":
        argv += ["--video", str(video)]
        images, crops = load_frames(video, 8), trained_crops
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
    assert prompt.pixel_values.shape[1] == crops + 1  # the crops and the global view


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
