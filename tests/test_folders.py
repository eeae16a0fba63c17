"""Every folder phivision writes carries what the official checkpoint's folder carries.

A base folder is laid out as `microsoft/Phi-3.5-vision-instruct` is published (file names, JSON
keys, two shards with their index, the remote-code files with placeholder contents that fail if
anything imports them), with tiny weights. A run's `model/` and an export are compared with it
file by file and key by key; every difference is listed below with its reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import files_under, run_cli, train_run
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from phivision.evaluate.export import export_run
from phivision.model.weights import load_model
from phivision.processing.folder import REMOTE_CODE_FILES, save_model_folder
from phivision.processing.processor import Phi3VProcessor

PLACEHOLDER = 'raise ImportError("placeholder for the official remote code: phivision must never import it")\n'
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    "{{- '<|assistant|>\n' -}}{% endif %}"
)
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
DOCUMENTS = {
    "README.md": "the model card describes the base model, not the fine-tuned one",
    "CODE_OF_CONDUCT.md": "a policy of the base's hub repository",
    "SECURITY.md": "a policy of the base's hub repository",
    ".gitattributes": "git LFS settings of the base's hub repository",
}
LICENSES = {"LICENSE": "MIT licence of the base", "NOTICE.md": "third-party notices of the base"}

# Key layout vLLM's Phi-3-V loader maps (and the official remote code loads).
VLLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "model.vision_embed_tokens.", "lm_head.")

# Files of the base a folder does not carry / carries instead, with the reason.
SINGLE_SHARD = ("the tiny weights fit in one 5 GB shard, model.safetensors; the 4B bf16 model is written "
                "as model-0000k-of-00002.safetensors with model.safetensors.index.json, as published")
NOT_CARRIED = {**DOCUMENTS, **{name: SINGLE_SHARD for name in (*SHARDS, "model.safetensors.index.json")}}
ADDED = {"model.safetensors": SINGLE_SHARD}

# (file, key) -> reason for every JSON value (or key) that differs from the base's.
VERSION = "the transformers version that wrote the file"
DIFFERENCES = {
    ("config.json", "_name_or_path"): "transformers never writes it (it named the author's local folder)",
    ("config.json", "_attn_implementation"): "the attention kernel is chosen when loading; flash_attention_2 "
                                             "fails on machines without flash-attn",
    ("config.json", "transformers_version"): VERSION,
    ("generation_config.json", "eos_token_id"): "stop at <|end|> (32007) or <|endoftext|> (32000): a fine-tuned "
                                                "model never writes the published </s> (2) and would run on",
    ("generation_config.json", "_from_model_config"): "the file no longer copies config.json's values",
    ("generation_config.json", "transformers_version"): VERSION,
    ("preprocessor_config.json", "num_crops"): "the crops the model was trained with",
    ("preprocessor_config.json", "do_convert_rgb"): "the image processor's default, written out",
}


def _tiny_geometry(tiny: dict) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "img_processor", "rope_scaling")
    return {key: tiny[key] for key in keys}


def write_official_layout(tiny_model_dir: Path, base: Path) -> Path:
    """The published folder's files and JSON keys, with the tiny model's geometry and weights."""
    base.mkdir()
    tiny_config = json.loads((tiny_model_dir / "config.json").read_text())
    config = {
        "_name_or_path": "Phi-3.5-vision-instruct",
        "architectures": ["Phi3VForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                     "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
        "bos_token_id": 1,
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                       "use_hd_transform": True, "with_learnable_separator": True},
        "embd_pdrop": 0.0,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 131072,
        "model_type": "phi3_v",
        "original_max_position_embeddings": 4096,
        "pad_token_id": 32000,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.1",
        "use_cache": True,
        "vocab_size": 32064,
        "_attn_implementation": "flash_attention_2",
        **_tiny_geometry(tiny_config),
    }
    files = {
        "config.json": config,
        "generation_config.json": {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                                   "pad_token_id": 32000, "transformers_version": "4.38.1"},
        "preprocessor_config.json": {
            "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor",
                         "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor"},
            "num_crops": 4,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_processor_type": "Phi3VImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "processor_class": "Phi3VProcessor",
            "num_img_tokens": tiny_config["img_processor"]["num_img_tokens"],
        },
        "tokenizer_config.json": {
            "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "legacy": False,
            "model_max_length": 131072, "pad_token": "<|endoftext|>", "padding_side": "right",
            "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
            "use_default_system_prompt": False,
        },
        "special_tokens_map.json": {
            name: {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
            for name, content in (("bos_token", "<s>"), ("eos_token", "<|endoftext|>"),
                                  ("pad_token", "<|endoftext|>"), ("unk_token", "<unk>"))
        },
    }
    for name, values in files.items():
        (base / name).write_text(json.dumps(values, indent=2) + "\n")
    shutil.copyfile(tiny_model_dir / "tokenizer.json", base / "tokenizer.json")
    for name in REMOTE_CODE_FILES:
        (base / name).write_text(PLACEHOLDER)
    for name in (*DOCUMENTS, *LICENSES):
        (base / name).write_text(f"{name} of the base\n")
    weights = {name: tensor.to(torch.bfloat16) for name, tensor in load_file(tiny_model_dir / "model.safetensors").items()}
    names = sorted(weights)
    halves = (names[: len(names) // 2], names[len(names) // 2 :])
    weight_map = {}
    for shard, shard_names in zip(SHARDS, halves):
        save_file({name: weights[name] for name in shard_names}, base / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, shard))
    total = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return base


def assert_like_base(folder: Path, base: Path, also_differs: dict[tuple[str, str], str] | None = None,
                     model_card: bool = False) -> None:
    """Same files (except NOT_CARRIED / ADDED) and, in every JSON, the same keys and values (except DIFFERENCES).

    A training run's `model/` has its own README.md: phivision's card for the fine-tuned model.
    """
    differences = {**DIFFERENCES, **(also_differs or {})}
    expected = sorted((set(files_under(base)) - set(NOT_CARRIED)) | set(ADDED) | ({"README.md"} if model_card else set()))
    assert files_under(folder) == expected
    for name in expected:
        if not name.endswith(".json"):
            continue
        written, published = json.loads((folder / name).read_text()), json.loads((base / name).read_text())
        for key in sorted(set(written) | set(published)):
            if (name, key) in differences:
                continue
            assert key in written, f"{name}: {key!r} is missing"
            assert key in published, f"{name}: {key!r} is not in the published file"
            assert written[key] == published[key], f"{name}: {key!r} is {written[key]!r}, published {published[key]!r}"
    for name in (*REMOTE_CODE_FILES, *LICENSES, "tokenizer.json"):
        assert (folder / name).read_bytes() == (base / name).read_bytes(), name
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == ([32007, 32000], 32000)


@pytest.fixture(scope="module")
def official_base(tiny_model_dir, tmp_path_factory):
    return write_official_layout(tiny_model_dir, tmp_path_factory.mktemp("official") / "Phi-3.5-vision-instruct")


@pytest.fixture(scope="module")
def lora_on_base(official_base, digits, tmp_path_factory):
    return train_run(official_base, digits, tmp_path_factory.mktemp("lora-base") / "run", method="lora",
                     train_data=str(digits / "lora_train.jsonl"), max_steps=1, global_batch_size=4,
                     per_device_batch_size=4)


@pytest.fixture(scope="module")
def export_of_base(lora_on_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-base") / "merged"
    export_run(lora_on_base.output_dir, out, "bf16")
    return out


def test_the_base_layout_loads(official_base):
    """The layout itself is sound: phivision reads it (two shards, flash_attention_2 in config.json)."""
    assert load_model(official_base).config.hidden_size == 64
    assert Phi3VProcessor.from_pretrained(official_base).num_crops == 4


def test_an_export_matches_the_published_folder_file_by_file_and_key_by_key(export_of_base, official_base):
    assert_like_base(export_of_base, official_base)


def test_a_full_runs_model_folder_matches_the_published_folder(official_base, digits, tmp_path):
    result = train_run(official_base, digits, tmp_path / "run", max_steps=1)
    fp32 = {("config.json", "torch_dtype"): "trained in fp32 on a CPU: saved as trained (bf16 when trained in bf16)"}
    assert_like_base(result.model_dir, official_base, fp32, model_card=True)
    assert "a full fine-tune of `Phi-3.5-vision-instruct`" in (result.model_dir / "README.md").read_text()


def test_a_lora_adapter_folder_carries_the_processor_tokenizer_and_remote_code(lora_on_base, official_base):
    folder = lora_on_base.model_dir
    files = set(files_under(folder))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    for name in (*REMOTE_CODE_FILES, *LICENSES, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / name).read_bytes() == (official_base / name).read_bytes(), name
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    published = json.loads((official_base / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"] == published["auto_map"]
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == ([32007, 32000], 32000)


def test_an_export_has_exactly_the_key_layout_vllm_maps(export_of_base, official_base):
    with safe_open(str(export_of_base / "model.safetensors"), "pt") as weights:
        keys = set(weights.keys())
    index = json.loads((official_base / "model.safetensors.index.json").read_text())
    assert keys == set(index["weight_map"])
    assert all(key.startswith(VLLM_PREFIXES) for key in keys), sorted(k for k in keys if not k.startswith(VLLM_PREFIXES))
    assert {prefix for prefix in VLLM_PREFIXES if any(key.startswith(prefix) for key in keys)} == set(VLLM_PREFIXES)


def test_without_the_remote_code_no_auto_map_points_nowhere(official_base, tmp_path):
    base = tmp_path / "no-code"
    shutil.copytree(official_base, base)
    for name in REMOTE_CODE_FILES:
        (base / name).unlink()
    save_model_folder(load_model(base), Phi3VProcessor.from_pretrained(base), tmp_path / "out", base=base)
    for name in ("config.json", "preprocessor_config.json"):
        assert "auto_map" not in json.loads((tmp_path / "out" / name).read_text()), name
    assert not any((tmp_path / "out" / name).exists() for name in REMOTE_CODE_FILES)


def test_init_tiny_writes_a_folder_other_tools_read(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    run_cli(["init-tiny", str(tmp_path / "tiny")])
    folder = tmp_path / "tiny"
    for name in ("config.json", "preprocessor_config.json"):
        assert "auto_map" not in json.loads((folder / name).read_text()), name
    assert GenerationConfig.from_pretrained(folder).eos_token_id == [32007, 32000]
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    special = json.loads((folder / "special_tokens_map.json").read_text())
    assert {name: token["content"] for name, token in special.items()} == {
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "<|image_1|>\nWhat is shown?"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"
    assert (tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|end|>")) == (32000, 32007)
