"""Training: config errors, every method learns what it should, faults, resume, DDP and ZeRO-2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from helpers import (
    base_config,
    losses,
    phivision_command,
    run_on_two_processes,
    tensors,
    torchrun,
    wait_for,
    write_yaml,
)

from phivision.cli.main import main
from phivision.errors import PhivisionError
from phivision.recipes import recipe_path
from phivision.train.config import ConfigError, load_config
from phivision.train.run import run_training


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory):
    """48 real digit samples (and 16 for eval) from the demo's dataset writer."""
    from phivision.data.digits import write_digits_task

    root = tmp_path_factory.mktemp("digits")
    write_digits_task(root)
    for split, count in (("train", 48), ("test", 16)):
        lines = (root / f"{split}.jsonl").read_text().splitlines()[:count]
        (root / f"small_{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


# ---- configuration -------------------------------------------------------------------------


def test_unknown_key_suggests_the_right_one(tmp_path, tiny_model_dir):
    config = write_yaml(tmp_path / "c.yaml", base_config(tiny_model_dir, tmp_path, tmp_path / "o", learnig_rate=1))
    with pytest.raises(ConfigError, match="unknown config key 'learnig_rate' \\(did you mean 'learning_rate'\\?\\)"):
        load_config(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=dora"], "method must be one of full, freeze_vision, projector_only, lora, qlora"),
        (["packing=maybe"], "packing must be true/false"),
        (["num_crops=0"], "num_crops must be at least 1"),
        (["global_batch_size=10", "per_device_batch_size=4"], "not a multiple of per_device_batch_size=4"),
        (["method=qlora", "deepspeed=zero2"], "qlora does not combine with DeepSpeed"),
        (["eval_steps=5"], "eval_steps is set but eval_data is not"),
        (["learning_rate"], "write it as key=value"),
        (["learning_rate=0"], "learning_rate must be above 0"),
        (["eval_samples=0"], "eval_samples must be at least 1 (or null)"),
        (["warmup_steps=-1"], "warmup_steps must be 0 or more"),
    ],
)
def test_config_errors_are_one_clear_line_and_exit_2(tmp_path, tiny_model_dir, capsys, overrides, message):
    config = write_yaml(tmp_path / "c.yaml", base_config(tiny_model_dir, tmp_path, tmp_path / "o"))
    argv = ["train", str(config)]
    for override in overrides:
        argv += ["--set", override]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1


def test_overrides_are_typed_and_the_resolved_config_is_saved(tmp_path, tiny_model_dir, digits_data):
    config = load_config(None, ["max_steps=2", "method=freeze_vision", "packing=false"],
                         base=base_config(tiny_model_dir, digits_data, tmp_path / "run"))
    assert (config.max_steps, config.method, config.packing) == (2, "freeze_vision", False)
    run_training(config)
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved == config


def test_relative_paths_are_saved_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["model=models/base", "train_data=data/train.jsonl", "output_dir=runs/one"],
                         base={"eval_data": None})
    assert (config.model, config.train_data, config.output_dir, config.eval_data) == (
        str(tmp_path / "models/base"), str(tmp_path / "data/train.jsonl"), str(tmp_path / "runs/one"), None)


@pytest.mark.parametrize("method, overrides, expected", [
    ("qlora", [], True), ("lora", [], False), ("full", [], False),
    ("qlora", ["gradient_checkpointing=false"], False), ("full", ["gradient_checkpointing=true"], True),
])
def test_gradient_checkpointing_defaults_on_for_qlora_only(tmp_path, tiny_model_dir, method, overrides, expected):
    config = load_config(None, [f"method={method}", *overrides], base=base_config(tiny_model_dir, tmp_path, tmp_path / "o"))
    assert config.resolved_gradient_checkpointing is expected


# ---- methods -------------------------------------------------------------------------------


def train(tmp_path, model_dir, data, **overrides):
    config = load_config(None, base=base_config(model_dir, data, tmp_path / "run", **overrides))
    return run_training(config)


def test_full_fine_tuning_learns_and_writes_the_official_layout(tmp_path, tiny_model_dir, digits_data):
    result = train(tmp_path, tiny_model_dir, digits_data)
    curve = losses(result.output_dir)
    assert curve[-1] < curve[0] - 1.0
    before, after = tensors(tiny_model_dir), tensors(result.model_dir)
    assert before.keys() == after.keys()
    assert not torch.equal(before["model.layers.0.mlp.down_proj.weight"], after["model.layers.0.mlp.down_proj.weight"])
    unused = "model.vision_embed_tokens.img_processor.vision_model.post_layernorm.weight"
    assert torch.equal(before[unused], after[unused])
    for name in ("report.md", "loss.png", "config.yaml", "metrics.jsonl", "model/preprocessor_config.json",
                 "model/tokenizer.json"):
        assert (result.output_dir / name).is_file(), name


def test_freeze_vision_leaves_clip_bitwise_unchanged_but_trains_embeddings(tmp_path, tiny_model_dir, digits_data):
    result = train(tmp_path, tiny_model_dir, digits_data, method="freeze_vision")
    before, after = tensors(tiny_model_dir), tensors(result.model_dir)
    clip = [name for name in before if ".img_processor." in name]
    assert clip and all(torch.equal(before[name], after[name]) for name in clip)
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(before["model.vision_embed_tokens.img_projection.0.weight"],
                           after["model.vision_embed_tokens.img_projection.0.weight"])


def test_projector_only_trains_projection_and_separators_only(tmp_path, tiny_model_dir, digits_data):
    result = train(tmp_path, tiny_model_dir, digits_data, method="projector_only")
    before, after = tensors(tiny_model_dir), tensors(result.model_dir)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {
        "model.vision_embed_tokens.img_projection.0.weight", "model.vision_embed_tokens.img_projection.0.bias",
        "model.vision_embed_tokens.img_projection.2.weight", "model.vision_embed_tokens.img_projection.2.bias",
        "model.vision_embed_tokens.glb_GN", "model.vision_embed_tokens.sub_GN",
    }


def test_lora_trains_adapters_on_the_official_targets_and_leaves_the_base(tmp_path, tiny_model_dir, digits_data):
    result = train(tmp_path, tiny_model_dir, digits_data, method="lora", learning_rate=1e-2)
    curve = losses(result.output_dir)
    assert curve[-1] < curve[0]
    assert not result.model.is_gradient_checkpointing  # only qlora recomputes by default
    base = tensors(tiny_model_dir)
    state = {name.replace("base_model.model.", "").replace(".base_layer", ""): tensor
             for name, tensor in result.model.state_dict().items() if "lora_" not in name}
    assert all(torch.equal(base[name], state[name].float()) for name in base)
    adapter = load_file(result.model_dir / "adapter_model.safetensors")
    adapted = {name.split(".lora_")[0].replace("base_model.model.", "") for name in adapter}
    assert "model.layers.1.self_attn.qkv_proj" in adapted and "model.layers.0.mlp.gate_up_proj" in adapted
    assert "model.vision_embed_tokens.img_projection.2" in adapted
    assert "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.1.mlp.fc2" in adapted
    assert not any("encoder.layers.2." in name for name in adapted)  # the unused last CLIP layer
    config = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == 8


def test_qlora_keeps_the_decoder_in_4_bit_and_the_vision_side_unquantised(tmp_path, tiny_model_dir, digits_data):
    import bitsandbytes as bnb

    result = train(tmp_path, tiny_model_dir, digits_data, method="qlora", learning_rate=1e-2)
    curve = losses(result.output_dir)
    assert curve[-1] < curve[0]
    assert result.model.is_gradient_checkpointing  # qlora's default
    modules = dict(result.model.named_modules())
    qkv = modules["base_model.model.model.layers.0.self_attn.qkv_proj"].base_layer
    assert isinstance(qkv, bnb.nn.Linear4bit) and qkv.weight.quant_type == "nf4"
    from phivision.model.weights import load_model
    from phivision.train.methods import parameter_count

    adapters = parameter_count(result.model, trainable_only=True)
    assert parameter_count(result.model) - adapters == parameter_count(load_model(tiny_model_dir))  # 4-bit counted whole
    projection = modules["base_model.model.model.vision_embed_tokens.img_projection.0"].base_layer
    assert type(projection) is torch.nn.Linear


def test_qlora_keeps_its_unquantised_weights_in_the_compute_dtype(tmp_path, tiny_model_dir, digits_data):
    """peft's kbit preparation lifted CLIP, the projector, embeddings and lm_head to fp32 (~1 GB at the official shape)."""
    from phivision.train.methods import load_for_training

    config = load_config(None, base=base_config(tiny_model_dir, digits_data, tmp_path / "run", method="qlora",
                                                precision="bf16", learning_rate=1e-2, max_steps=4))
    weights = dict(load_for_training(config).named_parameters())
    prefix = "base_model.model."
    unquantised = ["model.embed_tokens.weight", "lm_head.weight",
                   "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight",
                   "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.self_attn.q_proj.base_layer.weight",
                   "model.vision_embed_tokens.img_projection.0.base_layer.weight", "model.vision_embed_tokens.glb_GN"]
    assert {name: weights[prefix + name].dtype for name in unquantised} == dict.fromkeys(unquantised, torch.bfloat16)
    assert all(weight.dtype == torch.float32 for name, weight in weights.items() if "lora_" in name)
    curve = losses(run_training(config).output_dir)
    assert len(curve) == 4 and curve[-1] < curve[0]


# ---- faults --------------------------------------------------------------------------------


def test_bad_sample_fails_up_front_unless_skipping_is_asked_for(tmp_path, tiny_model_dir, digits_data):
    data = tmp_path / "data.jsonl"
    lines = (digits_data / "small_train.jsonl").read_text().splitlines()[:16]
    lines.insert(3, '{"id": "broken", "conversations": [{"images": ["train/missing.png"], "user": "q", "assistant": "a"}]}')
    data.write_text("\n".join(lines) + "\n")
    overrides = {"train_data": str(data), "train_image_root": str(digits_data / "images"), "max_steps": 1}
    with pytest.raises(PhivisionError, match=r"(?s)1 invalid sample\(s\) in .*data.jsonl:\n  .*data.jsonl:4: image .*missing.png does not exist"):
        train(tmp_path, tiny_model_dir, digits_data, **overrides)
    result = train(tmp_path, tiny_model_dir, digits_data, skip_invalid=True, **overrides)
    assert result.skipped_samples == 1
    assert "1 skipped" in (result.output_dir / "report.md").read_text()


def test_too_long_sample_is_an_error_naming_the_fix(tmp_path, tiny_model_dir, digits_data):
    with pytest.raises(PhivisionError, match="over max_length=20 .*skip_too_long: true"):
        train(tmp_path, tiny_model_dir, digits_data, max_length=20)


# ---- processes -----------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path, tiny_model_dir, digits_data):
    """Only the killed run needs its own process; the straight run and the resume run in this one."""
    values = base_config(tiny_model_dir, digits_data, tmp_path / "straight", max_steps=12, save_steps=6,
                         save_total_limit=None)
    assert main(["train", str(write_yaml(tmp_path / "straight.yaml", values))]) == 0
    killed = write_yaml(tmp_path / "killed.yaml", {**values, "output_dir": str(tmp_path / "killed")})
    process = subprocess.Popen(phivision_command("train", str(killed)), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    wait_for(tmp_path / "killed" / "checkpoint-6", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "model").exists()
    assert main(["train", str(killed), "--resume", "auto"]) == 0
    first, second = tensors(tmp_path / "straight" / "model"), tensors(tmp_path / "killed" / "model")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_exits_130(tmp_path, tiny_model_dir, digits_data):
    values = base_config(tiny_model_dir, digits_data, tmp_path / "run", max_steps=400, save_steps=1000)
    config = write_yaml(tmp_path / "c.yaml", values)
    process = subprocess.Popen(phivision_command("train", str(config)), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    wait_for(tmp_path / "run" / "metrics.jsonl", process)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    checkpoints = list((tmp_path / "run").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and "--resume auto" in output


@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [None, "zero2"])
def test_two_process_training_on_cpu(tmp_path, tiny_model_dir, digits_data, deepspeed):
    values = base_config(tiny_model_dir, digits_data, tmp_path / "run", global_batch_size=8,
                         per_device_batch_size=2, max_steps=4, save_steps=2)
    if deepspeed:
        values["deepspeed"] = deepspeed
    completed = torchrun(tmp_path, write_yaml(tmp_path / "c.yaml", values))
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert completed.stdout.count("done: 4 steps") == 1  # one summary for the job, from rank 0
    assert "built successfully" not in completed.stdout  # DeepSpeed's op-build notes stay quiet
    curve = losses(tmp_path / "run")
    assert len(curve) == 4 and curve[-1] < curve[0]
    assert (tmp_path / "run" / "model" / "config.json").is_file()


@pytest.mark.parametrize("recipe", ["docvqa", "hateful_memes", "nlvr2", "ucf101"])
def test_shipped_recipes_load_with_the_published_per_method_values(recipe):
    full = load_config(recipe_path(recipe))
    lora = load_config(recipe_path(recipe), ["method=lora"])
    assert full.deepspeed == "zero2" and lora.deepspeed is None
    assert lora.resolved_learning_rate == 2e-4
    published = {"docvqa": (5e-6, 32, 16), "hateful_memes": (5e-5, 128, 256), "nlvr2": (1e-5, 64, 128),
                 "ucf101": (1e-5, 64, 128)}[recipe]
    assert (full.resolved_learning_rate, lora.lora_rank, lora.resolved_lora_alpha) == published


def test_a_recipe_name_trains_the_shipped_config_from_any_folder(tmp_path, tiny_model_dir, digits_data, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the recipe comes from the installed package
    overrides = {"model": tiny_model_dir, "train_data": digits_data / "small_train.jsonl", "output_dir": "run",
                 "eval_data": "null", "eval_steps": "null", "deepspeed": "null", "precision": "fp32",
                 "gradient_checkpointing": "false", "max_steps": 2, "global_batch_size": 8,
                 "per_device_batch_size": 8, "num_crops": 1, "dataloader_workers": 0}
    argv = ["train", "docvqa", *[word for key, value in overrides.items() for word in ("--set", f"{key}={value}")]]
    assert main(argv) == 0
    import yaml

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["learning_rate"], saved["metric"], saved["save_steps"], saved["warmup_steps"]) == (5e-6, "anls", 200, 50)
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_recipes_lists_the_shipped_recipes_and_prints_one(capsys):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out.splitlines()
    for name, data in (("docvqa", "data/docvqa/docvqa_train.jsonl"), ("nlvr2", "data/nlvr2/nlvr2_train.jsonl"),
                       ("hateful_memes", "data/hateful_memes/hateful_memes_train.jsonl"),
                       ("ucf101", "data/ucf101/ucf101_train.jsonl")):
        line = next(line for line in listing if line.startswith(name + " "))
        assert data in line and len(line.split(data, 1)[1].strip()) > 20, line
    assert main(["recipes", "nlvr2"]) == 0
    assert capsys.readouterr().out == recipe_path("nlvr2").read_text()
    assert main(["recipes", "nlvr3"]) == 2
    assert "no recipe named 'nlvr3': choose one of docvqa, hateful_memes, nlvr2, ucf101" in capsys.readouterr().err
    assert main(["train", "configs/docvqa.yaml"]) == 2
    assert "neither a file nor a recipe name" in capsys.readouterr().err


@pytest.mark.slow
def test_a_wheel_ships_the_recipes(tmp_path):
    """A user who installed the wheel has no configs/ folder: the recipes are inside the package."""
    import zipfile

    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root, tmp_path / "src", ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build"))
    completed = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                                str(tmp_path / "dist"), str(tmp_path / "src")], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("phivision-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"phivision/recipes/{name}.yaml" for name in ("docvqa", "hateful_memes", "nlvr2", "ucf101")} <= names


def test_command_line_beats_per_method_values(tmp_path, tiny_model_dir):
    values = {**base_config(tiny_model_dir, tmp_path, tmp_path / "o"),
              "per_method": {"lora": {"learning_rate": 2e-4, "lora_rank": 32}}}
    config = load_config(write_yaml(tmp_path / "c.yaml", values), ["method=lora", "learning_rate=1e-3"])
    assert (config.learning_rate, config.lora_rank) == (1e-3, 32)
    with pytest.raises(ConfigError, match="per_method has unknown method 'dora'"):
        load_config(None, base={**values, "per_method": {"dora": {}}})


def test_token_budget_packing_trains_with_variable_samples_per_step(tmp_path, tiny_model_dir, digits_data):
    """48 digit samples of 37 tokens under a 200-token budget: 5 per step, so one epoch is 10 steps."""
    result = train(tmp_path, tiny_model_dir, digits_data, max_tokens_per_batch=200, max_length=100,
                   global_batch_size=1, per_device_batch_size=1, max_steps=-1, epochs=1, save_steps=100)
    assert result.global_step == 10
    curve = losses(result.output_dir)
    assert curve[-1] < curve[0]


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path, tiny_model_dir, digits_data):
    train(tmp_path, tiny_model_dir, digits_data, max_steps=3)
    with pytest.raises(PhivisionError, match="already holds a run \\(checkpoint-3\\): continue it with --resume auto"):
        train(tmp_path, tiny_model_dir, digits_data, max_steps=3)


def test_a_finished_run_without_checkpoints_says_so(tmp_path, tiny_model_dir, digits_data):
    import shutil

    result = train(tmp_path, tiny_model_dir, digits_data, max_steps=2)
    shutil.rmtree(result.output_dir / "checkpoint-2")  # e.g. deleted to save space after the run
    for resume in (None, "auto"):
        config = load_config(None, base=base_config(tiny_model_dir, digits_data, tmp_path / "run", max_steps=2))
        with pytest.raises(PhivisionError, match="holds a finished run \\(model/\\) with no checkpoint left"):
            run_training(config, resume=resume)


def test_resume_from_a_renamed_checkpoint_after_a_torn_metrics_line(tmp_path, tiny_model_dir, digits_data):
    import shutil

    first = train(tmp_path, tiny_model_dir, digits_data, max_steps=3, save_steps=3)
    best = tmp_path / "best"
    shutil.copytree(first.output_dir / "checkpoint-3", best)
    shutil.rmtree(first.output_dir / "model")
    with (first.output_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 4, "lo')  # the process was killed mid-line
    config = load_config(None, base=base_config(tiny_model_dir, digits_data, tmp_path / "run", max_steps=5))
    result = run_training(config, resume=str(best))
    assert result.global_step == 5
    steps = [json.loads(line)["step"] for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 5 and 4 in steps


@pytest.mark.slow
def test_deepspeed_config_also_runs_without_torchrun(tmp_path, tiny_model_dir, digits_data):
    values = base_config(tiny_model_dir, digits_data, tmp_path / "run", max_steps=2, save_steps=2,
                         deepspeed="zero2")
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    completed = subprocess.run(phivision_command("train", str(write_yaml(tmp_path / "c.yaml", values))),
                               capture_output=True, text=True, env={**env, "DS_ACCELERATOR": "cpu"})
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert "OMP_NUM_THREADS" not in completed.stderr  # accelerate's thread note stays quiet
    assert sorted(p.name for p in (tmp_path / "run" / "model").iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_task_metric_is_evaluated_every_eval_steps_and_plotted(tmp_path, tiny_model_dir, digits_data, method):
    from phivision.cli.evaluation_callback import task_metric_callbacks

    eval_data = tmp_path / "eval.jsonl"
    lines = (digits_data / "small_test.jsonl").read_text().splitlines()
    eval_data.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")  # skipped, counted, never evaluated
    values = base_config(tiny_model_dir, digits_data, tmp_path / "run", method=method, max_steps=4, eval_steps=2,
                         skip_invalid=True,
                         eval_data=str(eval_data), eval_image_root=str(digits_data / "images"), eval_samples=5,
                         max_new_tokens=3)
    config = load_config(None, base=values)
    result = run_training(config, callbacks=task_metric_callbacks(config))
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [2, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert all(0 <= r["eval_accuracy"] <= 1 for r in records if "eval_accuracy" in r)
    report = (result.output_dir / "report.md").read_text()
    assert f"- accuracy on `{eval_data}`" in report and f"- loss on `{eval_data}`" in report


def _finite_on_rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from phivision.train.trainer import finite_everywhere

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        finite = torch.tensor(1.5)
        results[rank] = (finite_everywhere(finite), finite_everywhere(torch.tensor(float("nan")) if rank else finite))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_non_finite_loss_on_one_process_stops_every_process():
    assert run_on_two_processes(_finite_on_rank) == {0: (True, False), 1: (True, False)}
