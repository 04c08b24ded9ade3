"""Video files through OpenCV: reading frames (every N-th, or at a frame rate) and `oilleak predict clip.mp4`'s
outputs: an overlay video, one JSON line per predicted frame, and a summary.

OpenCV decodes with the FFmpeg it is built with (opencv-python-headless ships one), so the common containers
work: MP4, MOV, M4V, AVI, MKV, WebM, MPEG and WMV. A file it cannot open, or opens without frames, gets a
message naming it and those formats.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from oilleak.errors import OilleakError

VIDEO_EXTENSIONS = {".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv"}
FORMATS = "MP4, MOV, M4V, AVI, MKV, WebM, MPEG, WMV"


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass(frozen=True)
class Frame:
    index: int  # in the file, from 0
    time_s: float
    image: np.ndarray  # RGB uint8


def _open(path: Path) -> tuple[cv2.VideoCapture, float]:
    if not path.is_file():
        raise OilleakError(f"{path}: no such video file")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise OilleakError(f"{path}: OpenCV cannot open this video (damaged, or a codec it lacks); "
                           f"the formats that work: {FORMATS}. Convert it, e.g. `ffmpeg -i {path.name} out.mp4`")
    fps = capture.get(cv2.CAP_PROP_FPS)
    return capture, fps if fps and np.isfinite(fps) and fps > 0 else 25.0  # no rate recorded: a common default


def frame_step(source_fps: float, every: int | None, fps: float | None) -> int:
    """Keep every ``step``-th frame: ``every`` as given, or the step nearest to ``fps`` frames a second."""
    if every is not None and fps is not None:
        raise OilleakError("give --every N or --fps F, not both")
    if every is not None:
        if every < 1:
            raise OilleakError(f"--every {every}: must be 1 or more (1: every frame)")
        return every
    if fps is not None:
        if fps <= 0:
            raise OilleakError(f"--fps {fps:g}: must be more than 0")
        return max(1, round(source_fps / fps))
    return 1


def read_frames(path: str | Path, every: int | None = None, fps: float | None = None) -> Iterator[Frame]:
    """The kept frames of a video, decoded one at a time (memory stays flat whatever the length)."""
    path = Path(path)
    capture, source_fps = _open(path)
    step = frame_step(source_fps, every, fps)
    try:
        index = 0
        while True:
            if index % step:
                if not capture.grab():  # skipped frames are not converted
                    break
            else:
                ok, bgr = capture.read()
                if not ok:
                    break
                yield Frame(index, index / source_fps, np.ascontiguousarray(bgr[..., ::-1]))
            index += 1
        if index == 0:
            raise OilleakError(f"{path}: OpenCV opens it but reads no frame (damaged, or a codec it lacks); "
                               f"the formats that work: {FORMATS}")
    finally:
        capture.release()


def video_info(path: str | Path) -> tuple[float, int]:
    """The frame rate and the frame count the container states (0 when it states none)."""
    capture, fps = _open(Path(path))
    count = int(max(0, capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
    capture.release()
    return fps, count


@dataclass
class VideoSummary:
    """What summary.json of a video run holds."""

    source: str
    classes: list[str]
    score_thr: float
    frames_predicted: int = 0
    frames_with_leaks: int = 0
    # per class: the largest leak share of the frame and when (frame index, time)
    largest: dict[str, dict] = field(default_factory=dict)

    def add(self, record: dict) -> None:
        self.frames_predicted += 1
        if record["instances"]:
            self.frames_with_leaks += 1
        for name, share in record["leak_area_share_per_class"].items():
            best = self.largest.get(name)
            if share > 0 and (best is None or share > best["leak_area_share"]):
                self.largest[name] = {"leak_area_share": share, "frame": record["frame"], "time_s": record["time_s"]}

    def to_dict(self) -> dict:
        return {"source": self.source, "classes": self.classes, "score_thr": self.score_thr,
                "frames_predicted": self.frames_predicted, "frames_with_leaks": self.frames_with_leaks,
                "largest_leak_share_per_class": self.largest}


class VideoOutputs:
    """``NAME.overlay.mp4`` (the kept frames with their overlays, at the rate they were kept), ``NAME.frames.jsonl``
    (one instances record per kept frame, with ``frame`` and ``time_s``) and ``NAME.summary.json``, under ``out_dir``."""

    def __init__(self, out_dir: Path, name: str, source: Path, classes: list[str], score_thr: float, kept_fps: float):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.video_path = out_dir / f"{name}.overlay.mp4"
        self.lines_path = out_dir / f"{name}.frames.jsonl"
        self.summary_path = out_dir / f"{name}.summary.json"
        self.summary = VideoSummary(str(source), classes, score_thr)
        self.kept_fps = kept_fps
        self._writer: cv2.VideoWriter | None = None
        self._lines = self.lines_path.open("w", encoding="utf-8")

    def add(self, overlay: np.ndarray, record: dict) -> None:
        if self._writer is None:
            height, width = overlay.shape[:2]
            self._writer = cv2.VideoWriter(str(self.video_path), cv2.VideoWriter_fourcc(*"mp4v"), self.kept_fps, (width, height))
            if not self._writer.isOpened():
                raise OilleakError(f"{self.video_path}: OpenCV cannot write an MP4 video here")
        self._writer.write(np.ascontiguousarray(overlay[..., ::-1]))
        self._lines.write(json.dumps(record) + "\n")
        self._lines.flush()  # an interrupted run keeps the frames it has done
        self.summary.add(record)

    def close(self) -> dict:
        if self._writer is not None:
            self._writer.release()
        self._lines.close()
        summary = self.summary.to_dict()
        self.summary_path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        return summary
