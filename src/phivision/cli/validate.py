"""`phivision validate DATA.jsonl`: every problem of a dataset, then a summary; exit 1 unless clean."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA.jsonl", help="the jsonl dataset to check")
    parser.add_argument(
        "--image-root", metavar="DIR", help="folder the image paths are relative to (default: images/ beside DATA)"
    )
    parser.add_argument("--model", metavar="DIR", help="model folder whose processor counts tokens per sample")
    parser.add_argument("--num-crops", type=int, metavar="N", help="crops per image when counting tokens (with --model)")
    parser.add_argument("--max-length", type=int, metavar="L", help="report samples longer than L tokens (with --model)")
    parser.add_argument("--max-problems", type=int, default=50, metavar="N", help="problems to print (default: 50)")
    parser.add_argument("--allow-duplicate-ids", action="store_true",
                        help="count repeated ids instead of reporting them as problems")
    parser.add_argument(
        "--no-decode", action="store_true", help="only check that media files exist, without decoding them (faster)"
    )


def run(args: argparse.Namespace) -> int:
    from phivision.data.validate import validate_file
    from phivision.errors import PhivisionError

    if args.model is None and (args.max_length is not None or args.num_crops is not None):
        raise PhivisionError("--max-length and --num-crops count tokens, which needs a model folder: add --model DIR")
    token_counter = None
    if args.model is not None:
        from phivision.data.dataset import build_token_counter
        from phivision.model.weights import check_model_folder

        check_model_folder(args.model)
        token_counter = build_token_counter(args.model, args.num_crops, args.data, args.image_root)
    report = validate_file(
        args.data,
        image_root=args.image_root,
        decode_images=not args.no_decode,
        token_counter=token_counter,
        max_length=args.max_length,
        max_problems=args.max_problems,
        allow_duplicate_ids=args.allow_duplicate_ids,
    )
    for problem in report.problems:
        print(problem)
    hidden = report.problem_count - len(report.problems)
    if hidden:
        print(f"... and {hidden} more problems")
    print(report.summary())
    return 0 if report.clean else 1
