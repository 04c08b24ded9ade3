"""What the model found in one image (or one video frame): :class:`Result` and its :class:`Leak` instances.

A Result keeps every instance the model outlined at or above the threshold it ran at, so ``filter`` can raise
the threshold afterwards without running the model again (what the service's page does with its slider).
Masks are kept as crops around each instance (a 50-megapixel photo with many leaks stays small); ``Leak.mask()``
gives the full-size mask on demand. ``to_dict()`` is the one record `oilleak predict` writes to
``instances/NAME.json`` and `oilleak serve` answers with (:func:`oilleak.predict.files.instances_record`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from oilleak.errors import OilleakError
from oilleak.predict import files
from oilleak.predict.instances import Instance, mask_polygons


@dataclass(frozen=True)
class Leak:
    """One outlined oil stain."""

    instance: Instance  # label, score, box, mask crop and its origin (holes filled: see instances.fill_holes)
    class_name: str
    image_size: tuple[int, int]  # (width, height) of the image it was found in

    @property
    def label(self) -> int:
        return self.instance.label

    @property
    def score(self) -> float:
        return self.instance.score

    @property
    def box(self) -> tuple[float, float, float, float]:
        """x1, y1, x2, y2 in image pixels."""
        return self.instance.box

    @property
    def area_px(self) -> int:
        return self.instance.area

    @property
    def area_share(self) -> float:
        return self.area_px / (self.image_size[0] * self.image_size[1])

    @cached_property
    def polygons(self) -> list[list[tuple[float, float]]]:
        """Its outlines in image pixels, one per separate part (:func:`oilleak.predict.instances.mask_polygons`)."""
        return mask_polygons(self.instance)

    def mask(self) -> np.ndarray:
        """The full-size (height, width) bool mask."""
        width, height = self.image_size
        return self.instance.full_mask(height, width)


@dataclass
class Result:
    """One image's leaks at or above ``score_thr``; ``image`` is the RGB picture they were found in."""

    source: str  # the file, "clip.mp4" for a video frame, or "<array>" / "<PIL image>" for pictures in memory
    image: np.ndarray = field(repr=False)
    classes: list[str]
    score_thr: float
    found: list[Instance] = field(repr=False)  # at or above ``computed_thr``, best first
    computed_thr: float  # the threshold the model ran at: the lowest ``filter`` can go
    top_score: float | None = None  # the best score of any detection, kept or not (None: nothing detected)
    frame: int | None = None  # video frames: the frame's index in the file and its time
    time_s: float | None = None
    error: str | None = None  # only from stream(..., errors="report"): why this input gave no result

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @cached_property
    def leaks(self) -> list[Leak]:
        kept = [inst for inst in self.found if inst.score >= self.score_thr]
        return [Leak(inst, self.classes[inst.label], (self.width, self.height)) for inst in kept]

    def __len__(self) -> int:
        return len(self.leaks)

    def __iter__(self):
        return iter(self.leaks)

    def filter(self, score_thr: float) -> Result:
        """The same result at another threshold, without running the model again. It can go down only to the
        threshold the detector ran at (below it, no mask was computed)."""
        if score_thr < self.computed_thr:
            raise OilleakError(f"filter({score_thr:g}): this result holds the leaks scoring {self.computed_thr:g} or more; "
                               f"run the detector with score_thr={score_thr:g} to see lower ones")
        return replace(self, score_thr=score_thr)

    @property
    def leak_area_px(self) -> int:
        """Pixels inside at least one leak (the union of the masks)."""
        return files.union_area([leak.instance for leak in self.leaks])

    @property
    def leak_area_share(self) -> float:
        return self.leak_area_px / (self.width * self.height)

    @property
    def leak_area_share_per_class(self) -> dict[str, float]:
        pixels = self.width * self.height
        return {name: files.union_area([leak.instance for leak in self.leaks if leak.label == k]) / pixels
                for k, name in enumerate(self.classes)}

    def to_dict(self) -> dict:
        """``instances/NAME.json``'s record (:func:`oilleak.predict.files.instances_record`); video frames add
        ``frame`` and ``time_s``."""
        leaks = self.leaks
        record = files.instances_record(self.source, self.height, self.width, [leak.instance for leak in leaks],
                                        [leak.polygons for leak in leaks], self.classes, self.score_thr)
        if self.frame is not None:
            record = {"frame": self.frame, "time_s": round(self.time_s or 0.0, 3), **record}
        return record

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self) -> np.ndarray:
        """The overlay: the image with the masks, outlines, boxes, class names and scores (RGB uint8)."""
        return files.overlay_image(self.image, [leak.instance for leak in self.leaks], self.classes)

    def save(self, out_dir: str | Path, name: str | None = None, *, labelme: bool = False) -> dict[str, Path]:
        """Write what `oilleak predict` writes for this image under ``out_dir``: ``overlays/NAME.jpg``,
        ``instances/NAME.json`` and with ``labelme`` ``labelme/NAME.json`` beside a copy of the image file.
        ``name`` defaults to the source file's stem (``frame_000042`` for video frames). Existing files are
        never replaced: that raises, naming them."""
        out_dir = Path(out_dir)
        name = name or self._default_name()
        paths = {"overlay": files.output_file(out_dir, "overlays", name, ".jpg"),
                 "instances": files.output_file(out_dir, "instances", name, ".json")}
        source = Path(self.source)
        if labelme:
            if not source.is_file():
                raise OilleakError(f"save(labelme=True) needs the image file beside the labelme file; {self.source} is "
                                   "not a file (pictures in memory: save them first, or leave labelme out)")
            paths["labelme"] = files.output_file(out_dir, "labelme", name, ".json")
        taken = [str(p) for p in paths.values() if p.exists()]
        if taken:
            raise OilleakError(f"save({out_dir}): {', '.join(taken)} already exist; oilleak never replaces files: "
                               "choose another folder or name")
        leaks = [leak.instance for leak in self.leaks]
        files.write_overlay(paths["overlay"], self.image, leaks, self.classes, self.score_thr, self.top_score)
        files.write_json(paths["instances"], self.to_dict())
        if labelme:
            files.write_labelme(paths["labelme"], source, self.height, self.width, leaks,
                                [leak.polygons for leak in self.leaks], self.classes)
        return paths

    def _default_name(self) -> str:
        if self.frame is not None:
            return f"{Path(self.source).stem}_frame{self.frame:06d}"
        return Path(self.source).stem if not self.source.startswith("<") else "image"
