"""Correct at real scale: long sequences beside short ones, generation across the rope threshold, eval loss.

The long-context model folder lowers `original_max_position_embeddings` to 64 tokens (and
`max_position_embeddings` to keep the official factor of 32), so samples cross it cheaply; its
short and long rope factors differ.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from phivision.data.collate import Collator
from phivision.model.modeling import IGNORE_INDEX
from phivision.processing.processor import ChatTurn

THRESHOLD = 64


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    from phivision.processing.folder import write_random_model

    folder = write_random_model(tmp_path_factory.mktemp("long-context"), preset="tiny", num_crops=1, seed=0)
    config = json.loads((folder / "config.json").read_text())
    config.update(original_max_position_embeddings=THRESHOLD, max_position_embeddings=THRESHOLD * 32)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def long_model(long_model_dir):
    from phivision.model.weights import load_model

    return load_model(long_model_dir).eval()


@pytest.fixture(scope="module")
def processor(long_model_dir):
    from phivision.processing.processor import Phi3VProcessor

    return Phi3VProcessor.from_pretrained(long_model_dir)


def picture(shade: int) -> Image.Image:
    return Image.new("RGB", (70, 40), (shade, 255 - shade, (3 * shade) % 256))


def sample(processor, name: str, words: int, shade: int, for_generation: bool = False):
    question = " ".join(["describe"] * words) + "?"
    answer = None if for_generation else "it is a " + " ".join(["flat"] * words) + " picture"
    return processor.encode_conversation(name, [ChatTurn(question, answer, [picture(shade)])],
                                         for_generation=for_generation)


def logits_of(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**{key: value for key, value in batch.items() if key != "labels"}).logits


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_presets_have_distinct_short_and_long_factors(preset):
    """All ones for both (as before) would hide any rope mistake from the tests."""
    from phivision.model.tiny import preset_config

    rope = preset_config(preset).rope_parameters
    assert rope["rope_type"] == "longrope" and rope["original_max_position_embeddings"] == 4096
    short, long = rope["short_factor"], rope["long_factor"]
    assert all(a < b for a, b in zip(short[1:], long[1:])) and len(set(long)) == len(long)


def test_the_long_context_model_crosses_at_64(long_model):
    assert long_model.config.rope_parameters["original_max_position_embeddings"] == THRESHOLD


def test_a_short_sample_gets_the_same_logits_and_loss_whatever_it_is_batched_with(long_model, processor):
    short, long = sample(processor, "short", 3, 40), sample(processor, "long", 40, 200)
    assert len(short) < THRESHOLD < len(long)
    collate = Collator(processor.tokenizer.pad_id, processor.crop_size)
    pack = Collator(processor.tokenizer.pad_id, processor.crop_size, packing=True)
    alone = logits_of(long_model, collate([short]))[0]
    long_alone = logits_of(long_model, collate([long]))[0]
    padded = logits_of(long_model, collate([short, long]))
    packed = logits_of(long_model, pack([long, short]))[0]
    torch.testing.assert_close(padded[0, : len(short)], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[len(long):], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], long_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[: len(long)], long_alone, atol=1e-5, rtol=1e-5)

    # The training loss of the short sample, alone or beside a long one whose labels are masked.
    long.labels[:] = IGNORE_INDEX
    long_model.train()
    try:
        with torch.no_grad():
            losses = [long_model(**batch).loss for batch in
                      (collate([short]), collate([short, long]), pack([long, short]))]
    finally:
        long_model.eval()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(losses[2], losses[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("preset_threshold", [False, True])
def test_one_sequence_gets_transformers_own_rope_below_and_above_the_threshold(
        long_model_dir, tiny_model_dir, preset_threshold):
    """The official config's rule (4096 in the tiny preset as in the real checkpoint) and the lowered one."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from phivision.model.weights import load_model

    model = load_model(tiny_model_dir if preset_threshold else long_model_dir).eval()
    threshold = model.config.rope_parameters["original_max_position_embeddings"]
    assert threshold == (4096 if preset_threshold else THRESHOLD)
    ours = model.model.rotary_emb
    reference = Phi3RotaryEmbedding(model.config)
    generator = torch.Generator().manual_seed(0)
    for length in (threshold - 8, threshold, threshold + 1, threshold + 40):
        input_ids = torch.randint(3, 32000, (1, length), generator=generator)
        with torch.no_grad():
            model.model.rotary_emb = ours
            mine = model(input_ids=input_ids, logits_to_keep=8).logits
            model.model.rotary_emb = reference
            theirs = model(input_ids=input_ids, logits_to_keep=8).logits
        model.model.rotary_emb = ours
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


def greedy_without_cache(model, prompt, steps: int, stop_ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """The reference: every step runs the whole sequence again, alone, with no cache; tokens and logits."""
    ids = prompt.input_ids[None]
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            last = model(input_ids=ids, pixel_values=prompt.pixel_values, image_sizes=prompt.image_sizes,
                         use_cache=False, logits_to_keep=1).logits[0, -1]
            tokens.append(int(last.argmax()))
            logits.append(last)
            if tokens[-1] in stop_ids:
                break
            ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("lengths", [(20,), (20, 10)])
def test_generation_that_crosses_the_threshold_equals_a_loop_without_cache(long_model, processor, lengths):
    """Rows of a left-padded batch cross the threshold at different steps; each must match its own loop."""
    from phivision.data.collate import left_padded_prompts
    from phivision.evaluate.generate import generate

    prompts = [sample(processor, f"g{index}", words, 60 + 50 * index, for_generation=True)
               for index, words in enumerate(lengths)]
    steps = THRESHOLD + 10 - min(len(prompt) for prompt in prompts)
    tokenizer = processor.tokenizer
    expected = [greedy_without_cache(long_model, prompt, steps, tokenizer.stop_ids) for prompt in prompts]
    for prompt, (tokens, _) in zip(prompts, expected):
        assert len(prompt) <= THRESHOLD < len(prompt) + len(tokens) - 1, "the reference must cross the threshold"
    assert generate(long_model, processor, prompts, max_new_tokens=steps) == [
        tokenizer.decode(tokens).strip() for tokens, _ in expected]

    batch = left_padded_prompts(prompts, tokenizer.pad_id, processor.crop_size)
    with torch.no_grad():
        output = long_model.generate(**batch, max_new_tokens=steps, do_sample=False, eos_token_id=tokenizer.stop_ids,
                                     pad_token_id=tokenizer.pad_id, output_logits=True, return_dict_in_generate=True)
    width = batch["input_ids"].shape[1]
    for row, (tokens, logits) in enumerate(expected):
        assert output.sequences[row, width : width + len(tokens)].tolist() == tokens
        steps_logits = torch.stack([step[row] for step in output.logits[: len(tokens)]])
        torch.testing.assert_close(steps_logits, logits, atol=1e-4, rtol=1e-4)


# ---- evaluation loss ---------------------------------------------------------------------------


def eval_samples(processor) -> list:
    """Five answers of very different lengths: batches of two have unequal token counts."""
    answers = ["yes", "a long and winding answer about the picture " * 4, "no", "two words", "maybe " * 9]
    return [processor.encode_conversation(f"e{index}", [ChatTurn("What is it?", answer, [picture(30 * index)])])
            for index, answer in enumerate(answers)]


def token_mean_by_hand(model, processor, samples) -> float:
    """Sum of every supervised token's loss over the count of them, one sample at a time."""
    collate = Collator(processor.tokenizer.pad_id, processor.crop_size)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for encoding in samples:
            batch = collate([encoding])
            logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits[0, :-1]
            targets = batch["labels"][0, 1:]
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            tokens += int((targets != IGNORE_INDEX).sum())
    return total / tokens


def evaluation_trainer(model, processor, samples, output_dir, packing: bool):
    from transformers import TrainingArguments

    from phivision.train.trainer import PhivisionTrainer

    args = TrainingArguments(output_dir=str(output_dir), per_device_eval_batch_size=2, report_to="none",
                             remove_unused_columns=False, use_cpu=True, disable_tqdm=True)
    return PhivisionTrainer(model=model, args=args, eval_dataset=samples,
                            data_collator=Collator(processor.tokenizer.pad_id, processor.crop_size, packing=packing))


@pytest.mark.parametrize("packing", [False, True])
def test_eval_loss_is_the_token_mean_and_logits_are_computed_only_at_labels(long_model, processor, tmp_path, packing):
    samples = eval_samples(processor)
    expected = token_mean_by_hand(long_model, processor, samples)
    projected = []
    hook = long_model.lm_head.register_forward_hook(lambda module, args, output: projected.append(args[0].shape[:-1]))
    try:
        metrics = evaluation_trainer(long_model, processor, samples, tmp_path, packing).evaluate()
    finally:
        hook.remove()
        long_model.eval()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    supervised = [int((encoding.labels[1:] != IGNORE_INDEX).sum()) for encoding in samples]
    assert [tuple(shape) for shape in projected] == [(supervised[0] + supervised[1],),
                                                     (supervised[2] + supervised[3],), (supervised[4],)]


def _evaluate_on_rank(rank: int, port: int, results) -> None:
    from phivision.model.weights import load_model
    from phivision.processing.processor import Phi3VProcessor

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    folder, output_dir = os.environ["EVAL_TEST_MODEL"], os.environ["EVAL_TEST_OUTPUT"]
    processor = Phi3VProcessor.from_pretrained(folder)
    trainer = evaluation_trainer(load_model(folder), processor, eval_samples(processor), output_dir, False)
    try:
        results[rank] = trainer.evaluate()["eval_loss"]
    finally:
        trainer.accelerator.end_training()


@pytest.mark.slow
def test_two_process_eval_loss_is_the_token_mean_of_the_whole_set(long_model_dir, long_model, processor, tmp_path,
                                                                   monkeypatch):
    """Five samples over two processes in batches of two: one sample is repeated to even the batches."""
    from helpers import run_on_two_processes

    monkeypatch.setenv("EVAL_TEST_MODEL", str(long_model_dir))
    monkeypatch.setenv("EVAL_TEST_OUTPUT", str(tmp_path))
    results = run_on_two_processes(_evaluate_on_rank)
    expected = token_mean_by_hand(long_model, processor, eval_samples(processor))
    assert results[0] == pytest.approx(expected, rel=1e-5)
    assert results[1] == pytest.approx(expected, rel=1e-5)
