"""The embedded default: the demo learns real handwritten digits, and really reads the image."""

from __future__ import annotations

import json

import pytest

from phivision.cli.main import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--task", "digits"]) == 0
    return out


@pytest.mark.slow
def test_demo_learns_digits_from_the_images(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    assert [r["task"] for r in results] == ["digits"]
    assert results[0]["after"] >= 0.85 > results[0]["before"] + 0.5
    for name in ("report.md", "accuracy.png", "configs/digits.yaml", "runs/digits/report.md",
                 "runs/digits/loss.png", "runs/digits/eval/confusion_matrix.png"):
        assert (demo_run / name).is_file(), name
    assert "| digits | 10% |" in (demo_run / "report.md").read_text()


@pytest.mark.slow
def test_blanked_images_drop_accuracy_to_chance(demo_run, tmp_path):
    from phivision.cli.demo import evaluate
    from phivision.data.digits import blank_images

    blanked = blank_images(demo_run / "data" / "digits" / "test.jsonl", tmp_path / "blank")
    accuracy = evaluate(demo_run / "runs" / "digits" / "model", blanked)
    assert accuracy <= 0.2  # chance is 10%: without the image, the model can only guess
