"""`phivision bench`: analytic FLOPs, workload shapes, the official-compute switches, the command."""

from __future__ import annotations

import json

import pytest
import torch

from phivision.bench.flops import FlopTally, Learning, ModelShape, SampleWork, sample_flops, step_flops
from phivision.bench.workloads import (
    OFFICIAL_CROP_SIZE,
    encode_samples,
    official_processor,
    sample_shapes,
    sample_token_count,
    workload_cycle,
)
from phivision.data.collate import Collator
from phivision.model.tiny import preset_config, random_model
from phivision.processing.images import crop_grid
from phivision.processing.folder import processor_for
from phivision.processing.tokenizer import Phi3Tokenizer
from phivision.train.config import TrainConfig
from phivision.train.methods import apply_method

# A decoder small enough to count by hand: no images, every weight learns.
HAND = ModelShape(hidden=8, intermediate=16, layers=1, heads=2, kv_heads=2, vocab=10, vision_hidden=4,
                  vision_intermediate=8, vision_layers=1, patch_size=2, image_size=4, image_dim_out=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_processor_16():
    return processor_for(random_model("tiny").config, Phi3Tokenizer.bundled(), 16)


def test_one_linear_layer_by_hand():
    frozen_input = FlopTally()
    frozen_input.linear(rows=3, fan_in=4, fan_out=5, learns=True)
    assert (frozen_input.forward, frozen_input.backward) == (120, 120)  # 2*3*4*5; weight gradient only

    frozen_weight = FlopTally(needs_grad=True)
    frozen_weight.linear(rows=3, fan_in=4, fan_out=5, learns=False)
    assert (frozen_weight.forward, frozen_weight.backward) == (120, 120)  # input gradient only

    adapted = FlopTally(needs_grad=True)
    adapted.linear(rows=3, fan_in=4, fan_out=5, learns=False, lora_rank=2)
    down, up = 2 * 3 * 4 * 2, 2 * 3 * 2 * 5  # A: 4 -> 2, B: 2 -> 5
    assert adapted.forward == 120 + down + up
    assert adapted.backward == 120 + (down + up) + up + down  # base input; A, B weights; B input; A input


def test_decoder_step_written_out():
    work = SampleWork(tokens=10, supervised=3, crops=0, image_tokens=0)
    qkv, attention, out = 2 * 10 * 8 * 24, 4 * 10 * 10 * 8, 2 * 10 * 8 * 8
    gate_up, down = 2 * 10 * 8 * 32, 2 * 10 * 16 * 8
    head = 2 * 3 * 8 * 10
    forward = qkv + attention + out + gate_up + down + head
    full = sample_flops(HAND, Learning.for_method("full"), work)
    assert full.forward == forward
    assert full.backward == 2 * forward  # everything learns and every activation needs a gradient
    lora = sample_flops(HAND, Learning.for_method("lora", lora_rank=1, lora_groups=["decoder"]), work)
    # nothing learns before the first qkv: its input gradient is skipped; the head has no weight gradient
    adapters = sum(2 * 10 * (a + b) for a, b in ((8, 24), (8, 8), (8, 32), (16, 8)))
    assert lora.forward == forward + adapters
    assert lora.backward < full.backward


@pytest.mark.parametrize("method", ["full", "freeze_vision", "lora", "projector_only"])
def test_analytic_flops_equal_torch_flop_counter(method, tiny_processor_16):
    """Every matrix product PyTorch runs forward and backward (eager attention) is counted, no more."""
    from torch.utils.flop_counter import FlopCounterMode

    model = random_model("tiny", attn="eager")
    config = TrainConfig(model="-", train_data="-", output_dir="-", method=method, lora_dropout=0.0)
    model = apply_method(model, config).train()
    shapes = workload_cycle("mixed")
    encodings = encode_samples([shapes[2], shapes[5]], tiny_processor_16)  # two images; eight video frames
    collator = Collator(tiny_processor_16.tokenizer.pad_id, tiny_processor_16.crop_size)
    expected = 0
    counted = 0
    for encoding in encodings:
        with FlopCounterMode(display=False) as counter:
            model(**collator([encoding])).loss.backward()
        counted += counter.get_total_flops()
        work = SampleWork.of(encoding, tiny_processor_16.crop_size)
        expected += step_flops(ModelShape.from_config(model.config), Learning.for_method(method), [work])
    assert counted == expected


def test_frozen_parts_cost_less_than_full_fine_tuning():
    shape = ModelShape.from_config(preset_config("small"))
    work = SampleWork(tokens=330, supervised=4, crops=17, image_tokens=293)
    full = step_flops(shape, Learning.for_method("full"), [work])
    frozen_vision = step_flops(shape, Learning.for_method("freeze_vision"), [work])
    assert frozen_vision < full
    assert step_flops(shape, Learning.for_method("lora"), [work]) < full
    assert step_flops(shape, Learning.for_method("projector_only"), [work]) < frozen_vision
    # a frozen CLIP tower with pixel input has no backward at all
    vision_only = Learning.for_method("freeze_vision")
    with_images = sample_flops(shape, vision_only, work)
    without_clip = sample_flops(shape, vision_only, SampleWork(330, 4, 0, 0))
    clip_forward = with_images.forward - without_clip.forward - 2 * 293 * (4 * 256 * 512 + 512 * 512)
    assert clip_forward > 0
    projector_backward = 2 * 2 * 293 * (4 * 256 * 512 + 512 * 512)  # input and weight gradients
    assert with_images.backward - without_clip.backward == projector_backward


def test_docvqa_mean_tokens_match_the_official_figure():
    """Computed from crop grids and the real tokenizer at 336-px geometry, without a 4B model."""
    processor = official_processor()
    counts = [sample_token_count(shape, processor) for shape in workload_cycle("docvqa")]
    assert abs(sum(counts) / len(counts) - 2443) < 25
    grids = [crop_grid(*shape.image_sizes[0], 16, OFFICIAL_CROP_SIZE) for shape in workload_cycle("docvqa")]
    assert grids.count((4, 4)) == 5 and grids.count((4, 3)) == 1  # letter pages, one longer page
    video = workload_cycle("video")[0]
    assert len(video.image_sizes) == 8 and video.num_crops == 4
    assert sample_token_count(video, processor) > 8 * 757  # 8 frames of 2x2 crops, plus the class list
    memes = workload_cycle("memes")
    assert all(len(shape.image_sizes) == 1 and shape.answer_words == 1 for shape in memes)


def test_encoded_samples_match_the_analytic_lengths(tiny_processor_16):
    shapes = sample_shapes("mixed", 10)
    encodings = encode_samples(shapes, tiny_processor_16)
    assert [len(encoding) for encoding in encodings] == [
        sample_token_count(shape, tiny_processor_16, index) for index, shape in enumerate(shapes)
    ]
    assert {encoding.pixel_values.shape[1] for encoding in encodings} == {17}  # N + 1 slots everywhere
    assert len(set(map(len, encodings))) > 3  # a spread of lengths
    assert tiny_processor_16.crop_size < OFFICIAL_CROP_SIZE


def test_official_compute_switches_change_work_not_results(tiny_processor_16):
    """CLIP on padding crops and all-position logits (the official code's work) give the same loss."""
    from phivision.bench.runner import official_compute

    model = random_model("tiny").train()
    encoding = encode_samples(sample_shapes("memes", 2), tiny_processor_16)[1]
    inputs = Collator(tiny_processor_16.tokenizer.pad_id, tiny_processor_16.crop_size)([encoding])
    inputs["pixel_values"] = encoding.pixel_values  # every slot, as the official processor sends
    with torch.no_grad():
        default = model(**inputs)
        with official_compute(model, True):
            assert model.model.vision_embed_tokens.encode_padding_crops
            official = model(**inputs)
    assert not model.model.vision_embed_tokens.encode_padding_crops and model.supervised_logits_only
    torch.testing.assert_close(default.loss, official.loss)
    labelled = int((encoding.labels[1:] != -100).sum())
    assert default.logits.shape == (labelled, model.config.vocab_size)
    assert official.logits.shape == (1, len(encoding), model.config.vocab_size)


def test_meta_initialised_model_matches_a_normally_built_one():
    from phivision.bench.models import random_weights

    built = random_model("tiny")
    materialised = random_weights("tiny", torch.device("cpu"))
    for (name, expected), (_, actual) in zip(built.named_buffers(), materialised.named_buffers()):
        assert torch.equal(expected, actual), name
    for (name, expected), (_, actual) in zip(built.named_parameters(), materialised.named_parameters()):
        assert expected.shape == actual.shape and expected.requires_grad == actual.requires_grad, name
        assert abs(expected.std().item() - actual.std().item()) < 0.02 + 0.2 * expected.std().item(), name


def test_bench_command_writes_results(tmp_path, capsys):
    from phivision.cli.main import main

    output = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--method", "lora",
            "--matmul-size", "256", "--threads", "1", "--output", str(output)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "lora" in printed and "MFU" in printed
    results = json.loads(output.read_text())
    assert {"command", "git_commit", "machine", "settings", "methods", "errors", "memory_ratios"} <= set(results)
    lora = results["methods"]["lora"]
    expected = {"images_per_s", "tokens_per_s", "step_time_s", "peak_memory_bytes", "peak_rss_bytes", "flops_per_step",
                "mfu", "peak_matmul_flops_per_s", "losses", "trainable_parameters", "gradient_checkpointing"}
    assert expected <= set(lora)
    assert lora["images_per_s"] > 0 and lora["mfu"] > 0 and len(lora["losses"]) == 3
    assert lora["trainable_parameters"] < lora["total_parameters"]
    assert lora["gradient_checkpointing"] is False  # the method's training default
    weights = 4 * lora["total_parameters"]  # fp32 on a CPU
    assert weights < lora["peak_memory_bytes"] < lora["peak_rss_bytes"]


def test_bench_compare_prints_ratios(tmp_path, capsys):
    from phivision.cli.main import main

    output = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--steps", "1", "--warmup", "1", "--batch-size", "3",
            "--method", "freeze_vision", "--compare", "--matmul-size", "256", "--threads", "1", "--output", str(output)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "a/b =" in printed and "a/c =" in printed
    compare = json.loads(output.read_text())["compare"]["freeze_vision"]
    assert set(compare["paths"]) == {"phivision", "official", "padded"}
    assert compare["a_over_b_images_per_s"] > 0
    first = compare["first_loss"]
    assert first["official"] == pytest.approx(first["phivision"], rel=1e-4)
    assert first["padded"] == pytest.approx(first["phivision"], rel=1e-4)


def test_tensor_peak_counts_what_is_alive_at_the_worst_moment():
    from phivision.bench.memory import TensorPeak, storage_bytes

    weights = torch.zeros(1000)
    mib = 2**20
    with TensorPeak(torch.device("cpu"), resident=storage_bytes([weights, weights[:10]])) as peak:
        first = torch.ones(16 * mib)  # 64 MiB
        second = first * 2  # 128 MiB alive
        del first, second
        third = torch.ones(8 * mib)  # 32 MiB, after the peak
    assert 4000 + 128 * mib <= peak.bytes < 4000 + 128 * mib + 4096  # a few bytes of scalars besides
    assert third.numel() == 8 * mib


def test_model_tensors_count_4_bit_weights_with_their_quantisation_constants(tiny_model_dir):
    from phivision.bench.memory import model_tensors, storage_bytes
    from phivision.train.config import TrainConfig
    from phivision.train.methods import load_for_training

    config = TrainConfig(model=str(tiny_model_dir), train_data="-", output_dir="-", method="qlora", precision="fp32")
    model = load_for_training(config)
    weights = storage_bytes([*model.parameters(), *model.buffers()])
    quantised = [p for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    assert quantised
    absmax = storage_bytes([p.quant_state.absmax for p in quantised])
    assert storage_bytes(model_tensors(model)) > weights + absmax


def bench_arguments(argv: list[str]):
    import argparse

    from phivision.cli import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    bench._resolve_defaults(args)
    return args


def test_compare_measures_the_real_clip_tower_by_default():
    args = bench_arguments(["--compare"])
    assert (args.preset, args.workload, args.num_crops, args.micro_batch, args.vision_chunk) == (
        "clip-l", "docvqa", 4, 1, 5)
    assert args.compare == "official,padded"
    args = bench_arguments(["--compare", "official", "--num-crops", "2", "--vision-chunk", "3", "--micro-batch", "4"])
    assert (args.preset, args.num_crops, args.vision_chunk, args.micro_batch, args.compare) == (
        "clip-l", 2, 3, 4, "official")
    args = bench_arguments([])
    assert (args.preset, args.workload, args.num_crops, args.micro_batch, args.vision_chunk) == (
        "small", "mixed", None, None, None)
    args = bench_arguments(["--preset", "small", "--compare"])
    assert (args.preset, args.workload, args.num_crops) == ("small", "mixed", None)


def test_clip_l_preset_has_the_official_vision_geometry():
    config = preset_config("clip-l")
    vision = config.vision_config()
    assert (vision.num_hidden_layers, vision.hidden_size, vision.intermediate_size, vision.num_attention_heads,
            vision.image_size, vision.patch_size) == (24, 1024, 4096, 16, 336, 14)
    assert (config.crop_size, config.merged_grid, config.hidden_size, config.num_hidden_layers) == (336, 12, 512, 6)


def test_num_crops_caps_every_image(tiny_processor_16):
    shapes = sample_shapes("mixed", 10, num_crops=4)
    assert {shape.num_crops for shape in shapes} == {4}
    assert {shape.num_crops for shape in sample_shapes("mixed", 10)} == {4, 16}
    encodings = encode_samples(shapes[:3], tiny_processor_16)
    assert [tuple(encoding.pixel_values.shape[:2]) for encoding in encodings] == [(1, 5), (1, 5), (2, 5)]


def test_compare_refuses_an_unknown_path(capsys):
    from phivision.cli.main import main

    assert main(["bench", "--preset", "tiny", "--compare", "official,fast"]) == 2
    assert capsys.readouterr().err.strip() == (
        "phivision bench: error: --compare: unknown data path 'fast': choose from official, padded")


def test_micro_batches_accumulate_to_the_step_of_one_pass(tiny_processor_16):
    """`--micro-batch`: passes of fewer samples, gradients accumulated, the same loss and the same update."""
    from phivision.bench.runner import DATA_PATHS, make_optimizer, step_passes, train_step

    encodings = encode_samples(sample_shapes("mixed", 4, num_crops=4), tiny_processor_16)
    collator = Collator(tiny_processor_16.tokenizer.pad_id, tiny_processor_16.crop_size)
    labels = sum(int((encoding.labels[1:] != -100).sum()) for encoding in encodings)
    results = []
    for micro_batch in (None, 1):
        model = random_model("tiny").train()
        passes = step_passes(encodings, DATA_PATHS["phivision"], collator, micro_batch)
        assert len(passes) == (1 if micro_batch is None else 4)
        loss = train_step(model, make_optimizer(model, 1e-3), passes, torch.autocast("cpu", enabled=False), labels)
        results.append((loss, model.state_dict()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for name, weight in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], weight, rtol=1e-4, atol=1e-6, msg=name)
