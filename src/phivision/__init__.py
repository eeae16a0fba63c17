"""phivision: fine-tune Phi-3.5-vision / Phi-3-vision on your own image, multi-image and video data."""

__version__ = "0.1.0"
