"""The test resize's size rule, in plain Python: the data transforms use it, and so does what runs around an
exported ONNX graph (``oilleak.export.postprocess``), which imports no PyTorch; ``transforms.py`` does."""

from __future__ import annotations


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(new_w, new_h) of an image resized to fit ``scale = (long, short)`` with its aspect ratio kept."""
    long_side, short_side = max(scale), min(scale)
    s = min(long_side / max(width, height), short_side / min(width, height))
    return int(width * s + 0.5), int(height * s + 0.5)
