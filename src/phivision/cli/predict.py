"""`phivision predict`: one answer about images or a video, streamed to the terminal."""

from __future__ import annotations

import argparse

from phivision.cli.options import positive_int
from phivision.train.config import ATTENTIONS, PRECISIONS


CROPS_HELP = ("crops per image (default: the value the model was trained with: the adapter folder's "
              "preprocessor_config.json, else the model folder's)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder to apply (default: none)")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several; default: none)")
    parser.add_argument("--video", default=None, help="a video file, sampled to --frames frames (default: none)")
    parser.add_argument("--frames", type=positive_int, default=8, help="frames sampled from --video (default: %(default)s)")
    parser.add_argument("--prompt", required=True, help="the question, tokenised as plain text")
    parser.add_argument("--num-crops", type=positive_int, default=None, help=CROPS_HELP)
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="default: %(default)s")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="default: %(default)s")
    parser.add_argument("--attn", choices=ATTENTIONS, default="sdpa", help="default: %(default)s")


def run(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from phivision.evaluate.generate import generate, inference_processor, load_for_inference
    from phivision.model.weights import check_model_folder
    from phivision.processing.images import load_image
    from phivision.processing.processor import ChatTurn
    from phivision.processing.video import load_frames

    check_model_folder(args.model)
    images = [load_image(path) for path in args.image]
    names = list(args.image)
    if args.video:
        frames = load_frames(args.video, args.frames)
        images += frames
        names += [f"{args.video} frame {k + 1}" for k in range(len(frames))]
    processor = inference_processor(args.model, args.adapter, args.num_crops)
    model = load_for_inference(args.model, args.adapter, args.precision, args.attn)
    prompt = processor.encode_conversation("prompt", [ChatTurn(args.prompt, None, images, names)], for_generation=True)
    streamer = TextStreamer(_StreamingTokenizer(processor.tokenizer), skip_prompt=True)
    generate(model, processor, [prompt], args.max_new_tokens, streamer=streamer)
    return 0


class _StreamingTokenizer:
    """The small part of a tokenizer interface `TextStreamer` uses."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
