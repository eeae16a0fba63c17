"""`phivision eval`: batched greedy generation on a jsonl dataset, metrics, predictions.jsonl."""

from __future__ import annotations

import argparse
import json
import os

from phivision.cli.options import positive_int
from phivision.cli.predict import CROPS_HELP
from phivision.train.config import ATTENTIONS, PRECISIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (a base, or a run's model/ folder)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder to apply to --model (default: none)")
    parser.add_argument("--data", required=True, help="jsonl dataset")
    parser.add_argument("--image-root", default=None, help="image folder (default: images/ beside the jsonl)")
    parser.add_argument("--metric", choices=["auto", "accuracy", "anls"], default="auto", help="default: %(default)s")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="default: %(default)s")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="default: %(default)s")
    parser.add_argument("--num-crops", type=positive_int, default=None, help=CROPS_HELP)
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="evaluate only the first N samples (default: all)")
    parser.add_argument("--allow-duplicate-ids", action="store_true",
                        help="evaluate data whose ids repeat (predictions.jsonl repeats them too)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="default: %(default)s")
    parser.add_argument("--attn", choices=ATTENTIONS, default="sdpa", help="default: %(default)s")
    parser.add_argument("--out", default=None, help="folder for predictions.jsonl and metrics.json (default: none)")


def run(args: argparse.Namespace) -> int:
    from phivision.cli.distributed import init_distributed, process_group_left_on_exit
    from phivision.errors import PhivisionError
    from phivision.evaluate.evaluation import evaluate_dataset
    from phivision.evaluate.generate import inference_processor, load_for_inference
    from phivision.model.weights import check_model_folder

    if args.out and os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise PhivisionError(f"--out {args.out} is a file: --out names a folder for predictions.jsonl and "
                             "metrics.json; choose a folder")
    if not args.allow_duplicate_ids:
        from phivision.data.format import JsonlDataset
        from phivision.data.validate import check_unique_ids

        samples = JsonlDataset(args.data)
        check_unique_ids(samples[i] for i in range(len(samples)))
    check_model_folder(args.model)
    with process_group_left_on_exit():
        init_distributed()
        processor = inference_processor(args.model, args.adapter, args.num_crops)
        model = load_for_inference(args.model, args.adapter, args.precision, args.attn)
        metrics = evaluate_dataset(model, processor, args.data, args.image_root, args.metric, args.batch_size,
                                   args.max_new_tokens, args.limit, args.out)
    if metrics:
        name = metrics["metric"]
        print(f"{name}: {metrics[name]:.4f} on {metrics['samples']} samples")
        if "per_class_accuracy" in metrics:
            print(json.dumps(metrics["per_class_accuracy"], indent=2))
        if args.out:
            print(f"wrote {args.out}/predictions.jsonl and {args.out}/metrics.json")
    return 0
