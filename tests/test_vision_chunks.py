"""CLIP over the crops of a micro-batch in chunks: the same loss and gradients, one chunk's activations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from phivision.bench.memory import TensorPeak
from phivision.bench.workloads import encode_samples, sample_shapes
from phivision.data.collate import Collator
from phivision.model.tiny import random_model
from phivision.processing.folder import processor_for
from phivision.processing.tokenizer import Phi3Tokenizer
from phivision.train.config import ConfigError, TrainConfig, load_config
from phivision.train.methods import apply_method


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def packed_batch():
    """Three samples packed in one row: 17 + 17 + 10 crops (two 16-crop images, a 4-crop pair)."""
    processor = processor_for(random_model("tiny").config, Phi3Tokenizer.bundled(), 16)
    encodings = encode_samples(sample_shapes("mixed", 3), processor)
    return Collator(processor.tokenizer.pad_id, processor.crop_size)(encodings)


def loss_and_gradients(model, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def first_layer_calls(model) -> list[int]:
    """Runs of CLIP's first MLP, counted in its `forward` (recomputation does not replay module hooks)."""
    calls = [0]
    fc1 = model.model.vision_embed_tokens.img_processor.vision_model.encoder.layers[0].mlp.fc1
    forward = fc1.forward

    def counted(hidden: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return forward(hidden)

    fc1.forward = counted
    return calls


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_chunks_give_the_loss_and_gradients_of_one_pass(packed_batch, checkpointing):
    model = random_model("tiny").train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    expected_loss, expected = loss_and_gradients(model, packed_batch)
    model.model.vision_embed_tokens.crops_per_chunk = 5
    calls = first_layer_calls(model)
    loss, gradients = loss_and_gradients(model, packed_batch)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert gradients.keys() == expected.keys()
    clip_gradients = [name for name in expected if ".img_processor." in name]
    assert len(clip_gradients) > 10
    for name, gradient in expected.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    # 44 crops in 9 chunks: without checkpointing the first 8 are recomputed in the backward pass;
    # with it every layer already recomputes itself, so no chunk runs a third time.
    assert calls[0] == (9 + 8 if not checkpointing else 9 + 9)


def test_frozen_clip_runs_each_chunk_once(packed_batch):
    config = TrainConfig(model="-", train_data="-", output_dir="-", method="freeze_vision", vision_crops_per_chunk=5)
    model = apply_method(random_model("tiny"), config).train()
    assert model.model.vision_embed_tokens.crops_per_chunk == 5
    calls = first_layer_calls(model)
    model(**packed_batch).loss.backward()
    assert calls[0] == 9


def clip_step_peak(tower, crops: torch.Tensor, crops_per_chunk: int | None) -> int:
    """Peak tensor bytes of CLIP's forward and backward on `crops`, besides its weights and gradients."""
    tower.zero_grad(set_to_none=False)
    with TensorPeak(torch.device("cpu"), resident=0) as peak:
        tower.chunked_features(crops, crops_per_chunk).square().mean().backward()
    return peak.bytes


def test_chunks_bound_clip_activation_memory():
    """Doubling the crops doubles the peak in one pass; in chunks it stays near one chunk's."""
    tower = random_model("tiny").model.vision_embed_tokens.img_processor.train()
    for parameter in tower.parameters():
        parameter.grad = torch.zeros_like(parameter)  # allocated up front, so the peaks hold activations only
    torch.manual_seed(0)
    crops = torch.randn(64, 3, 56, 56)
    whole_32, whole_64 = clip_step_peak(tower, crops[:32], None), clip_step_peak(tower, crops, None)
    chunked_32, chunked_64 = clip_step_peak(tower, crops[:32], 8), clip_step_peak(tower, crops, 8)
    assert whole_64 > 1.8 * whole_32
    assert chunked_64 < 0.4 * whole_64
    assert chunked_64 < 1.25 * chunked_32


def test_official_compute_runs_the_unused_last_layer_without_changing_features():
    tower = random_model("tiny").model.vision_embed_tokens.img_processor.eval()
    calls = [0]
    tower.vision_model.encoder.layers[-1].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    crops = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        default = tower.penultimate_features(crops)
        assert calls[0] == 0
        tower.run_unused_layers = True
        official = tower.penultimate_features(crops)
    assert calls[0] == 1
    assert torch.equal(default, official)


def test_crops_per_chunk_must_be_positive(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: m\ntrain_data: t.jsonl\noutput_dir: out\nvision_crops_per_chunk: 0\n")
    with pytest.raises(ConfigError, match="vision_crops_per_chunk must be at least 1"):
        load_config(path)


def test_a_resume_may_change_the_chunk_size_but_not_the_crops(tmp_path):
    from phivision.errors import PhivisionError
    from phivision.train.resume import RUN_RECORD, check_same_run, record_text, run_record

    config = TrainConfig(model="m", train_data="-", output_dir="-")
    (tmp_path / RUN_RECORD).write_text(record_text(run_record(config, 1)))
    assert check_same_run(tmp_path, run_record(dataclasses.replace(config, vision_crops_per_chunk=17), 1))
    with pytest.raises(PhivisionError, match="num_crops 4 -> 16"):
        check_same_run(tmp_path, run_record(dataclasses.replace(config, num_crops=16), 1))


def test_training_with_chunks_recomputes_and_learns_the_same(tmp_path, tiny_model_dir, digits, monkeypatch):
    """`vision_crops_per_chunk` reaches the model a run trains: the same losses and weights, CLIP recomputed."""
    from helpers import losses, tensors, train_run

    from phivision.model import vision

    recomputed = []

    def counting_checkpoint(function, chunk, **kwargs):
        recomputed.append(len(chunk))
        return torch.utils.checkpoint.checkpoint(function, chunk, **kwargs)

    train_run(tiny_model_dir, digits, tmp_path / "whole", max_steps=3, logging_steps=1)
    assert recomputed == []
    monkeypatch.setattr(vision, "checkpoint", counting_checkpoint)
    train_run(tiny_model_dir, digits, tmp_path / "chunks", max_steps=3, logging_steps=1, vision_crops_per_chunk=5)
    # 8 images of 2 crops (the global view and one crop) per micro-batch: chunks of 5, 5, 5 and 1.
    assert recomputed == [5, 5, 5] * 3
    assert losses(tmp_path / "chunks") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
    whole, chunks = tensors(tmp_path / "whole" / "model"), tensors(tmp_path / "chunks" / "model")
    for name, weight in whole.items():
        torch.testing.assert_close(chunks[name], weight, rtol=1e-4, atol=1e-5, msg=name)
