"""Text and images to model inputs as the official processor makes them, and model folders."""

from __future__ import annotations

from typing import TYPE_CHECKING

from phivision._lazy import lazy_exports

if TYPE_CHECKING:
    from phivision.processing.processor import Phi3VProcessor, ChatTurn, Encoded
    from phivision.processing.tokenizer import Phi3Tokenizer
    from phivision.processing.images import load_image, hd_transform
    from phivision.processing.video import load_frames
    from phivision.processing.folder import save_model_folder, complete_model_folder, write_random_model, processor_for

# public name -> the module that defines it
_EXPORTS = {
    "Phi3VProcessor": "phivision.processing.processor",
    "ChatTurn": "phivision.processing.processor",
    "Encoded": "phivision.processing.processor",
    "Phi3Tokenizer": "phivision.processing.tokenizer",
    "load_image": "phivision.processing.images",
    "hd_transform": "phivision.processing.images",
    "load_frames": "phivision.processing.video",
    "save_model_folder": "phivision.processing.folder",
    "complete_model_folder": "phivision.processing.folder",
    "write_random_model": "phivision.processing.folder",
    "processor_for": "phivision.processing.folder",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
