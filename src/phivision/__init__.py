"""phivision: fine-tune Phi-3.5-vision / Phi-3-vision on your own image, multi-image and video data.

The Python API, in the order a run uses it (see the README's "Python API" section)::

    import phivision

    result = phivision.train_model({"model": "models/tiny", "train_data": "data/train.jsonl",
                                    "output_dir": "runs/try", "max_steps": 10})
    model = phivision.load_for_inference("models/tiny", adapter=result.model_dir)
    processor = phivision.inference_processor("models/tiny", adapter=result.model_dir)

Every name is imported on first use, so `import phivision` (and the command line) loads neither
torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from phivision._lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    from phivision.cli.train import train_model
    from phivision.errors import PhivisionError
    from phivision.evaluate.evaluation import evaluate_dataset
    from phivision.evaluate.export import export_run
    from phivision.evaluate.generate import generate, inference_processor, load_for_inference
    from phivision.model.config import Phi3VConfig
    from phivision.model.modeling import Phi3VForCausalLM
    from phivision.model.weights import load_model
    from phivision.processing.folder import write_random_model
    from phivision.processing.images import load_image
    from phivision.processing.processor import ChatTurn, Phi3VProcessor
    from phivision.processing.tokenizer import Phi3Tokenizer
    from phivision.processing.video import load_frames
    from phivision.recipes import recipe_names, recipe_path
    from phivision.train.config import TrainConfig, load_config
    from phivision.train.run import TrainResult, run_training

# public name -> the module that defines it
_EXPORTS = {
    # model
    "Phi3VConfig": "phivision.model.config",
    "Phi3VForCausalLM": "phivision.model.modeling",
    "load_model": "phivision.model.weights",
    "write_random_model": "phivision.processing.folder",
    # inputs
    "Phi3VProcessor": "phivision.processing.processor",
    "ChatTurn": "phivision.processing.processor",
    "Phi3Tokenizer": "phivision.processing.tokenizer",
    "load_image": "phivision.processing.images",
    "load_frames": "phivision.processing.video",
    # training
    "TrainConfig": "phivision.train.config",
    "load_config": "phivision.train.config",
    "train_model": "phivision.cli.train",
    "run_training": "phivision.train.run",
    "TrainResult": "phivision.train.run",
    "recipe_names": "phivision.recipes",
    "recipe_path": "phivision.recipes",
    # inference and evaluation
    "load_for_inference": "phivision.evaluate.generate",
    "inference_processor": "phivision.evaluate.generate",
    "generate": "phivision.evaluate.generate",
    "evaluate_dataset": "phivision.evaluate.evaluation",
    "export_run": "phivision.evaluate.export",
    "PhivisionError": "phivision.errors",
}

__all__ = ["__version__", *_EXPORTS]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
