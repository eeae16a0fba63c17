"""The Python API: what `phivision` and its packages export, that importing it stays cheap, and
that the README's Python example runs as written (on a tiny model)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest
from helpers import code_blocks, readme_text, run_cli

import phivision
from phivision.errors import PhivisionError

PACKAGES = ("phivision", "phivision.model", "phivision.processing", "phivision.data", "phivision.train",
            "phivision.evaluate")
REQUIRED = ("Phi3VConfig", "Phi3VForCausalLM", "load_model", "Phi3VProcessor", "ChatTurn", "TrainConfig",
            "load_config", "train_model", "generate", "load_for_inference", "evaluate_dataset", "export_run")


def test_importing_phivision_and_its_packages_loads_neither_torch_nor_transformers():
    code = ("import sys, phivision, phivision.model, phivision.processing, phivision.data, phivision.train, "
            "phivision.evaluate; from phivision.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_exports_documented_typed_names(package):
    module = __import__(package, fromlist=["__all__"])
    assert module.__all__, f"{package} exports nothing"
    for name in module.__all__:
        value = getattr(module, name)
        assert name in dir(module)
        if inspect.isclass(value) or inspect.isfunction(value):
            own_doc = value.__dict__.get("__doc__") if inspect.isclass(value) else value.__doc__
            assert own_doc and not own_doc.startswith(f"{value.__name__}("), f"{package}.{name} has no docstring"
        if inspect.isfunction(value):
            signature = inspect.signature(value)
            assert signature.return_annotation is not inspect.Signature.empty, f"{package}.{name} has no return type"
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        module.nothing_here  # noqa: B018


def test_the_top_level_has_the_public_pieces():
    assert set(REQUIRED) <= set(phivision.__all__)
    from phivision.model.modeling import Phi3VForCausalLM

    assert phivision.Phi3VForCausalLM is Phi3VForCausalLM
    assert callable(phivision.generate)  # the function, not the module of the same name


def test_train_model_refuses_overrides_for_a_ready_config(tiny_model_dir, tmp_path):
    config = phivision.load_config(None, base={"model": str(tiny_model_dir), "train_data": "t.jsonl",
                                               "output_dir": str(tmp_path / "run")})
    with pytest.raises(PhivisionError, match="set the TrainConfig's fields"):
        phivision.train_model(config, overrides=["max_steps=1"])
    with pytest.raises(PhivisionError, match="unknown config key 'max_step' \\(did you mean 'max_steps'\\?\\)"):
        phivision.train_model({"model": tiny_model_dir, "train_data": "t.jsonl", "output_dir": tmp_path, "max_step": 1})


def readme_python_example() -> tuple[int, str]:
    """The README's Python block in its "Python API" section."""
    text = readme_text()
    lines = text.splitlines()
    start = lines.index("## Python API") + 1
    end = next(number for number in range(start + 1, len(lines) + 1) if lines[number - 1].startswith("## "))
    blocks = [(first, body) for first, language, body in code_blocks(text)
              if language == "python" and start < first < end]
    assert len(blocks) == 1, "the Python API section should hold one python example"
    first, body = blocks[0]
    return first, "\n".join(line for _, line in body)


def test_the_readme_python_example_runs(tmp_path, monkeypatch, digits, capsys):
    """Run as written, in a folder holding what it names: a tiny model for the base, digit data."""
    line, code = readme_python_example()
    base = "models/Phi-3.5-vision-instruct"
    assert f'base = "{base}"' in code
    monkeypatch.chdir(tmp_path)
    run_cli(["init-tiny", "models/tiny"])
    code = code.replace(f'base = "{base}"', 'base = "models/tiny"')
    data = tmp_path / "data"
    data.mkdir()
    (data / "images").symlink_to(digits / "images")
    (data / "train.jsonl").write_text((digits / "lora_train.jsonl").read_text())
    (data / "test.jsonl").write_text("\n".join((digits / "small_test.jsonl").read_text().splitlines()[:4]) + "\n")
    (data / "photo.png").symlink_to(digits / "images" / "test" / "0003.png")
    exec(compile(code, f"README.md (python block at line {line})", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    assert "3 steps, adapter in" in printed and "Phi3VForCausalLM 2 layers" in printed
    metrics = json.loads((tmp_path / "runs" / "python-api" / "eval" / "metrics.json").read_text())
    assert metrics["samples"] == 4
    assert (tmp_path / "models" / "python-api-merged" / "generation_config.json").is_file()
