"""Drawing instances on images: masks, outlines, boxes, class names and scores.

Used for the dataset gallery (`oilleak check --gallery`), `oilleak test --show-dir` and prediction overlays.
Images are numpy uint8 arrays (H, W, 3) in RGB.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """One distinct, saturated colour per class (evenly spaced hues, alternating brightness)."""
    colours = []
    for k in range(num_classes):
        hue = (k * 0.61803398875) % 1.0  # golden-ratio steps keep neighbouring classes far apart
        value = 1.0 if k % 2 == 0 else 0.75
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
        colours.append((int(r * 255), int(g * 255), int(b * 255)))
    return colours


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask that touch a pixel outside it (4-neighbourhood)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def draw_instances(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    masks: np.ndarray | None = None,
    scores: Sequence[float] | None = None,
    alpha: float = 0.45,
) -> np.ndarray:
    """Return a copy of ``image`` with each instance's mask (filled + outline), box and caption drawn.

    boxes: (n, 4) x1, y1, x2, y2 in pixels of ``image``; masks: (n, H, W) bool or None.
    """
    out = image.astype(np.float32).copy()
    colours = palette(len(class_names))
    n = len(labels)
    if masks is not None:
        for i in range(n):
            m = masks[i].astype(bool)
            colour = np.array(colours[int(labels[i])], np.float32)
            out[m] = out[m] * (1 - alpha) + colour * alpha
            out[_outline(m)] = colour
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(max(image.shape[:2]) / 600))
    for i in range(n):
        colour = colours[int(labels[i])]
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        caption = class_names[int(labels[i])]
        if scores is not None:
            caption += f" {float(scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 4, ty + th + 4], fill=colour)
        draw.text((x1 + 2, ty + 2 - top), caption, fill=(255, 255, 255) if sum(colour) < 500 else (0, 0, 0), font=font)
    return np.asarray(canvas)


def side_by_side(left: np.ndarray, right: np.ndarray, titles: tuple[str, str] = ("ground truth", "prediction")) -> np.ndarray:
    """Two images of the same size next to each other with a title bar above each."""
    h, w = left.shape[:2]
    bar = 18
    canvas = Image.new("RGB", (2 * w + 8, h + bar), (255, 255, 255))
    canvas.paste(Image.fromarray(left), (0, bar))
    canvas.paste(Image.fromarray(right), (w + 8, bar))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((4, 3), titles[0], fill=(0, 0, 0), font=font)
    draw.text((w + 12, 3), titles[1], fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def banner(image: np.ndarray, text: str) -> np.ndarray:
    """A copy of ``image`` with ``text`` on a dark strip across its top, in letters sized to the image, so a
    picture that shows nothing found cannot be mistaken for the input photo."""
    height, width = image.shape[:2]
    size = max(12, round(max(height, width) / 45))
    try:
        font = ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError):
        font = ImageFont.load_default()
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(3, size // 3)
    draw.rectangle([0, 0, width, bottom - top + 2 * pad], fill=(20, 20, 20))
    draw.text((pad, pad - top), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def save_image(image: np.ndarray, path) -> None:
    Image.fromarray(image).save(path)


def paint_mask_crops(
    image: np.ndarray,
    crops: Sequence[np.ndarray],
    origins: Sequence[tuple[int, int]],
    labels: Sequence[int],
    num_classes: int,
    alpha: float = 0.45,
) -> np.ndarray:
    """Like the mask part of :func:`draw_instances`, for masks given as crops (h, w) bool at (x, y) origins,
    so a very large image never needs a full-size array per instance. Draw boxes and captions after it
    with ``draw_instances(..., masks=None)``."""
    out = image.copy()
    colours = palette(num_classes)
    for crop, (x, y), label in zip(crops, origins, labels):
        h, w = crop.shape
        region = out[y : y + h, x : x + w]
        colour = np.array(colours[int(label)], np.float32)
        blended = region[crop].astype(np.float32) * (1 - alpha) + colour * alpha
        region[crop] = blended.clip(0, 255).astype(np.uint8)
        region[_outline(np.pad(crop, 1))[1:-1, 1:-1]] = colours[int(label)]  # padded: crop edges are mask edges
    return out
