"""The native Phi-3-V model: official layout, strict weights, batching, images, checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from phivision.errors import PhivisionError
from phivision.model.config import Phi3VConfig
from phivision.model.modeling import Phi3VForCausalLM
from phivision.model.tiny import preset_config
from phivision.model.weights import check_attention, load_model, save_model
from phivision.processing.processor import ChatTurn


def official_expected_shapes() -> dict[str, tuple[int, ...]]:
    """The official checkpoint's tensor names and shapes, from the published facts."""
    shapes = {
        "model.embed_tokens.weight": (32064, 3072),
        "model.norm.weight": (3072,),
        "lm_head.weight": (32064, 3072),
        "model.vision_embed_tokens.glb_GN": (1, 1, 4096),
        "model.vision_embed_tokens.sub_GN": (1, 1, 1, 4096),
        "model.vision_embed_tokens.img_projection.0.weight": (3072, 4096),
        "model.vision_embed_tokens.img_projection.0.bias": (3072,),
        "model.vision_embed_tokens.img_projection.2.weight": (3072, 3072),
        "model.vision_embed_tokens.img_projection.2.bias": (3072,),
    }
    for i in range(32):
        layer = f"model.layers.{i}."
        shapes[layer + "self_attn.qkv_proj.weight"] = (9216, 3072)
        shapes[layer + "self_attn.o_proj.weight"] = (3072, 3072)
        shapes[layer + "mlp.gate_up_proj.weight"] = (16384, 3072)
        shapes[layer + "mlp.down_proj.weight"] = (3072, 8192)
        shapes[layer + "input_layernorm.weight"] = (3072,)
        shapes[layer + "post_attention_layernorm.weight"] = (3072,)
    clip = "model.vision_embed_tokens.img_processor.vision_model."
    shapes[clip + "embeddings.class_embedding"] = (1024,)
    shapes[clip + "embeddings.patch_embedding.weight"] = (1024, 3, 14, 14)
    shapes[clip + "embeddings.position_embedding.weight"] = (577, 1024)
    for name in ("pre_layrnorm", "post_layernorm"):
        shapes[clip + name + ".weight"] = (1024,)
        shapes[clip + name + ".bias"] = (1024,)
    for j in range(24):
        layer = f"{clip}encoder.layers.{j}."
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[layer + f"self_attn.{projection}.weight"] = (1024, 1024)
            shapes[layer + f"self_attn.{projection}.bias"] = (1024,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[layer + norm + ".weight"] = (1024,)
            shapes[layer + norm + ".bias"] = (1024,)
        shapes[layer + "mlp.fc1.weight"] = (4096, 1024)
        shapes[layer + "mlp.fc1.bias"] = (4096,)
        shapes[layer + "mlp.fc2.weight"] = (1024, 4096)
        shapes[layer + "mlp.fc2.bias"] = (1024,)
    return shapes


def test_official_geometry_has_the_official_keys_and_shapes():
    with torch.device("meta"):
        model = Phi3VForCausalLM(preset_config("official"))
    actual = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    assert actual == official_expected_shapes()


OFFICIAL_CONFIG = {
    "_name_or_path": "Phi-3.5-vision-instruct",
    "architectures": ["Phi3VForCausalLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
    },
    "bos_token_id": 1,
    "embd_layer": {
        "embedding_cls": "image",
        "hd_transform_order": "sub_glb",
        "projection_cls": "mlp",
        "use_hd_transform": True,
        "with_learnable_separator": True,
    },
    "embd_pdrop": 0.0,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 3072,
    "img_processor": {
        "image_dim_out": 1024,
        "model_name": "openai/clip-vit-large-patch14-336",
        "name": "clip_vision_model",
        "num_img_tokens": 144,
    },
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "model_type": "phi3_v",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096,
    "pad_token_id": 32000,
    "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": [1.0 + i / 10 for i in range(48)], "short_factor": [1.0] * 48, "type": "su"},
    "rope_theta": 10000.0,
    "sliding_window": 262144,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.1",
    "use_cache": True,
    "vocab_size": 32064,
}


def test_official_config_reads_and_writes_back_in_the_same_form(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    config = Phi3VConfig.from_pretrained(tmp_path / "in")
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["original_max_position_embeddings"] == 4096
    assert (config.crop_size, config.merged_grid, config.image_dim_out) == (336, 12, 1024)
    config.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in OFFICIAL_CONFIG.items():
        if key not in ("transformers_version", "_name_or_path"):
            assert written[key] == value, key


def test_longrope_attention_scaling_matches_the_official_factor():
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    config = Phi3VConfig(**{k: v for k, v in OFFICIAL_CONFIG.items() if k != "auto_map"})
    rotary = Phi3RotaryEmbedding(config)
    expected = (1 + torch.log(torch.tensor(131072 / 4096)) / torch.log(torch.tensor(4096.0))).sqrt()
    assert rotary.attention_scaling == pytest.approx(float(expected), rel=1e-6)


def test_save_load_round_trip_is_bit_exact(tiny_model_dir, tmp_path):
    original = load_model(tiny_model_dir)
    save_model(original, tmp_path)
    reloaded = load_model(tmp_path)
    first, second = original.state_dict(), reloaded.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_saving_in_bf16_writes_bf16_and_leaves_the_model_in_fp32(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    save_model(model, tmp_path, "bf16")
    written = load_file(tmp_path / "model.safetensors")
    assert {tensor.dtype for tensor in written.values() if tensor.is_floating_point()} == {torch.bfloat16}
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert torch.equal(written["lm_head.weight"], before["lm_head.weight"].bfloat16())


def test_checkpoint_with_wte_alias_loads(tiny_model_dir, tmp_path):
    save_model(load_model(tiny_model_dir), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.vision_embed_tokens.wte.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert "model.vision_embed_tokens.wte.weight" not in load_model(tmp_path).state_dict()


def test_missing_key_is_an_error_naming_it(tiny_model_dir, tmp_path):
    save_model(load_model(tiny_model_dir), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PhivisionError, match=r"missing keys: model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(tmp_path)


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PhivisionError, match="pickle weights .*pytorch_model.bin"):
        load_model(tmp_path)


def test_flash_attention_fails_clearly_without_flash_attn():
    with pytest.raises(PhivisionError, match="flash"):
        check_attention("flash_attention_2")
    with pytest.raises(PhivisionError, match="unknown attention"):
        check_attention("xformers")


def image(seed: int, size=(70, 40)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def model_inputs(processor, encodings):
    from phivision.data.collate import Collator

    return Collator(processor.tokenizer.pad_id, processor.crop_size)(encodings)


def two_samples(processor):
    first = processor.encode_conversation("a", [ChatTurn("What is it?", "a cat", [image(1)])])
    second = processor.encode_conversation(
        "b", [ChatTurn("Compare them.", "they differ a lot", [image(2, (40, 90)), image(3)])]
    )
    return first, second


def test_padded_batch_gives_the_same_logits_as_each_sample_alone(tiny_model, tiny_processor):
    encodings = two_samples(tiny_processor)
    batch = model_inputs(tiny_processor, list(encodings))
    batch.pop("labels")
    with torch.no_grad():
        batched = tiny_model(**batch).logits
        for row, encoding in enumerate(encodings):
            alone = model_inputs(tiny_processor, [encoding])
            alone.pop("labels")
            logits = tiny_model(**alone).logits[0]
            torch.testing.assert_close(batched[row, : len(encoding)], logits, atol=1e-5, rtol=1e-5)


def test_packed_row_gives_the_same_loss_and_gradients_as_the_padded_batch(tiny_model_dir, tiny_processor):
    from phivision.data.collate import Collator

    encodings = list(two_samples(tiny_processor))
    results = []
    for packing in (False, True):
        model = load_model(tiny_model_dir)
        batch = Collator(tiny_processor.tokenizer.pad_id, tiny_processor.crop_size, packing=packing)(encodings)
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    assert padded_grads.keys() == packed_grads.keys()
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-5, rtol=1e-4)


def test_image_features_occupy_exactly_the_placeholder_positions(tiny_model, tiny_processor):
    turns = [ChatTurn("Compare.", "same", [image(1), image(2)])]
    encoding = tiny_processor.encode_conversation("p", turns)
    changed = tiny_processor.encode_conversation("p", [ChatTurn("Compare.", "same", [image(1), image(9)])])
    with torch.no_grad():
        before = tiny_model(**model_inputs(tiny_processor, [encoding])).logits[0]
        after = tiny_model(**model_inputs(tiny_processor, [changed])).logits[0]
    first_position = int((encoding.input_ids == -2).nonzero()[0])
    torch.testing.assert_close(before[:first_position], after[:first_position], atol=0, rtol=0)
    assert not torch.allclose(before[first_position], after[first_position])
    assert not torch.allclose(before[-1], after[-1])


def test_zero_padding_crops_never_reach_clip(tiny_model, tiny_processor):
    turns = [ChatTurn("What?", "x", [image(1, (150, 50))])]
    encoding = tiny_processor.encode_conversation("z", turns, num_crops=16)
    assert encoding.pixel_values.shape[1] == 17 and encoding.image_sizes.tolist() == [[112, 336]]
    seen = []
    clip = tiny_model.model.vision_embed_tokens.img_processor.vision_model.embeddings
    handle = clip.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    inputs = {
        "input_ids": encoding.input_ids[None],
        "pixel_values": encoding.pixel_values,
        "image_sizes": encoding.image_sizes,
    }
    with torch.no_grad():
        full = tiny_model(**inputs).logits
        trimmed = tiny_model(**{**inputs, "pixel_values": encoding.pixel_values[:, :13]}).logits
    handle.remove()
    assert seen == [13, 13]  # 2x6 grid: global view + 12 crops, out of 17 slots
    torch.testing.assert_close(full, trimmed, atol=0, rtol=0)


def test_samples_with_and_without_images_share_a_batch(tiny_model, tiny_processor):
    with_image = tiny_processor.encode_conversation("i", [ChatTurn("What?", "x", [image(1)])])
    text_only = tiny_processor.encode_conversation("t", [ChatTurn("Say hi.", "hi")])
    batch = model_inputs(tiny_processor, [text_only, with_image])
    with torch.no_grad():
        logits = tiny_model(**batch).logits
        alone = tiny_model(**model_inputs(tiny_processor, [text_only])).logits
    torch.testing.assert_close(logits[0, : len(text_only)], alone[0], atol=1e-5, rtol=1e-5)


def test_placeholder_count_mismatch_names_both_counts(tiny_model, tiny_processor):
    encoding = tiny_processor.encode_conversation("m", [ChatTurn("What?", "x", [image(1)])])
    count = int((encoding.input_ids < 0).sum())
    first_placeholder = int((encoding.input_ids < 0).nonzero()[0])
    input_ids = torch.cat([encoding.input_ids[:first_placeholder], encoding.input_ids[first_placeholder + 1 :]])[None]
    with pytest.raises(PhivisionError, match=f"give {count} feature tokens but the input has {count - 1}"):
        tiny_model(input_ids=input_ids, pixel_values=encoding.pixel_values, image_sizes=encoding.image_sizes)


def test_greedy_generation_with_cache_equals_without(tiny_model, tiny_processor):
    from phivision.data.collate import left_padded_prompts

    prompts = [
        tiny_processor.encode_conversation("g1", [ChatTurn("Describe.", None, [image(4)])], for_generation=True),
        tiny_processor.encode_conversation("g2", [ChatTurn("And this one, briefly?", None)], for_generation=True),
    ]
    batch = left_padded_prompts(prompts, tiny_processor.tokenizer.pad_id, tiny_processor.crop_size)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=tiny_processor.tokenizer.pad_id)
    with torch.no_grad():
        cached = tiny_model.generate(**batch, use_cache=True, **settings)
        uncached = tiny_model.generate(**batch, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    for row, prompt in enumerate(prompts):
        alone = left_padded_prompts([prompt], tiny_processor.tokenizer.pad_id, tiny_processor.crop_size)
        with torch.no_grad():
            single = tiny_model.generate(**alone, **settings)
        assert torch.equal(single[0, len(prompt):], cached[row, batch["input_ids"].shape[1]:])


def test_eager_and_sdpa_agree(tiny_model_dir, tiny_processor):
    batch = model_inputs(tiny_processor, list(two_samples(tiny_processor)))
    logits = []
    for attn in ("eager", "sdpa"):
        with torch.no_grad():
            logits.append(load_model(tiny_model_dir, attn=attn)(**batch).logits)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[0][mask], logits[1][mask], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tiny_processor):
    batch = model_inputs(tiny_processor, list(two_samples(tiny_processor)))
    gradients = []
    for checkpointing in (False, True):
        model = load_model(tiny_model_dir).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**batch).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-6, rtol=1e-5)


def test_every_trainable_parameter_gets_a_gradient(tiny_model_dir, tiny_processor):
    """What DDP needs: no parameter that requires grad is left without one (last CLIP layer is frozen)."""
    model = load_model(tiny_model_dir).train()
    model(**model_inputs(tiny_processor, list(two_samples(tiny_processor)))).loss.backward()
    without = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any("encoder.layers.2." in name for name in frozen) and any("post_layernorm" in n for n in frozen)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precisions_run(tiny_model_dir, tiny_processor, precision):
    model = load_model(tiny_model_dir, precision=precision)
    batch = model_inputs(tiny_processor, list(two_samples(tiny_processor)))
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)
