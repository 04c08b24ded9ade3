"""Batch prediction over image files, videos, folders and globs (`oilleak predict`).

Nothing the user has is overwritten: everything goes into a fresh output folder (``predictions/``, or
``predictions-2/``, ``-3``, ... when it already holds files), and two inputs that would get the same output
name (``a/img.jpg`` and ``b/img.jpg``, or ``img.jpg`` and ``img.png``) get ``img`` and ``img-2``; the
summary lists which file each name came from. An image that cannot be read is reported and skipped; the
run goes on. The files written are described in :mod:`oilleak.predict.files`.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from oilleak import distributed
from oilleak.errors import OilleakError
from oilleak.predict import files
from oilleak.predict.detector import Detector
from oilleak.predict.result import Result
from oilleak.progress import progress_bar

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class Source:
    path: Path
    name: str  # output name, unique in the run: relative path inside its input folder, without extension


@dataclass
class PredictReport:
    out_dir: Path
    processed: int = 0
    instances: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, reason)
    score_thr: float = 0.0
    top_score: float | None = None  # the highest score of any detection (kept or not); None: unknown
    videos: list[dict] = field(default_factory=list)  # each video's summary.json


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _inside(path: Path, folders: list[Path]) -> bool:
    parents = path.resolve().parents
    return any(folder.resolve() in parents for folder in folders)


def output_folders(out_dir: Path) -> list[Path]:
    """``out_dir`` and its numbered siblings (``out_dir-2``, ...): where earlier runs wrote."""
    siblings = out_dir.parent.glob(f"{glob.escape(out_dir.name)}-*") if out_dir.parent.is_dir() else []
    return [out_dir, *(p for p in siblings if p.name[len(out_dir.name) + 1 :].isdigit())]


def find_images(inputs: list[str], exclude: list[Path] | tuple[Path, ...] = ()) -> tuple[list[Source], list[tuple[str, str]]]:
    """Image files named directly, found (recursively) in folders, or matched by globs.

    Returns the sources with unique output names and the inputs that gave nothing, with why. Files found in
    a folder or by a glob under ``exclude`` (output folders) are skipped: a rerun never predicts overlays.
    """
    found: list[tuple[Path, str]] = []
    problems: list[tuple[str, str]] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            matches = [p for p in matches if not _inside(p, exclude)]
            found += [(p, p.relative_to(path).with_suffix("").as_posix()) for p in matches]
            if not matches:
                problems.append((text, f"no image ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder"))
        elif path.is_file():
            found.append((path, path.stem))  # named explicitly: tried whatever its extension
        elif _is_glob(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            matches = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not _inside(p, exclude)]
            found += [(p, p.stem) for p in matches]
            if not matches:
                problems.append((text, "the pattern matches no image file"))
        else:
            problems.append((text, "no such file or folder"))
    return _unique_names(found), problems


def _unique_names(found: list[tuple[Path, str]]) -> list[Source]:
    seen_paths: set[Path] = set()
    taken: set[str] = set()
    sources = []
    for path, name in found:
        resolved = path.resolve()
        if resolved in seen_paths:  # the same file reached through two inputs
            continue
        seen_paths.add(resolved)
        unique, n = name, 1
        while unique.lower() in taken:  # lower(): names must not clash on case-insensitive file systems either
            n += 1
            unique = f"{name}-{n}"
        taken.add(unique.lower())
        sources.append(Source(path, unique))
    return sources


def fresh_dir(path: Path) -> Path:
    """``path`` if it is missing or empty, else the first of ``path-2``, ``path-3``, ... that is."""
    candidate, n = path, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def predict_images(
    detector: Detector,
    sources: list[Source],
    out_dir: Path,
    *,
    save_labelme: bool = False,
    progress: bool = True,
    failures: list[tuple[str, str]] | None = None,
    summary_name: str = "summary.csv",
) -> PredictReport:
    """Predict every source and write its files (module docstring); ``failures`` are listed in the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PredictReport(out_dir, failures=list(failures or []), score_thr=detector.score_thr)
    summary = files.SummaryCsv(out_dir / summary_name, detector.classes)
    for text, reason in report.failures:
        summary.failed(text, "", reason)

    def finish(source: Source, result: Result, advance: Callable[[int], None]) -> None:
        result.save(out_dir, source.name, labelme=save_labelme)
        summary.ok(source.name, result.to_dict())
        report.processed += 1
        report.instances += len(result)
        advance(1)

    # The detector decodes the next image in its loader thread while the model runs, and a writer thread
    # writes the previous one's files (decoding, OpenCV and file writing release the GIL); one of each in
    # flight keeps memory flat and the summary in input order.
    try:
        with progress_bar(progress, len(sources), "predicting") as advance, \
                ThreadPoolExecutor(1, thread_name_prefix="oilleak-write") as writer:
            writing: Future | None = None
            results = detector.stream([source.path for source in sources], errors="report")
            for source, result in zip(sources, results):
                if writing is not None:
                    writing.result()  # rows stay in input order; re-raises the writer's error here
                    writing = None
                if result.error is not None:
                    report.failures.append((str(source.path), result.error))
                    summary.failed(str(source.path), source.name, result.error)
                    advance(1)
                    continue
                if result.top_score is not None:
                    report.top_score = max(report.top_score or 0.0, result.top_score)
                writing = writer.submit(finish, source, result, advance)
            if writing is not None:
                writing.result()
    finally:
        summary.close()
    return report


def predict_video(detector: Detector, source: Source, out_dir: Path, *, every: int | None, fps: float | None,
                  progress: bool = True) -> dict:
    """A video's overlay video, per-frame JSON lines and summary (:class:`oilleak.predict.video.VideoOutputs`)."""
    from oilleak.predict.video import VideoOutputs, frame_step, video_info

    rate, frames = video_info(source.path)
    step = frame_step(rate, every, fps)
    outputs = VideoOutputs(out_dir, source.name, source.path, detector.classes, detector.score_thr, rate / step)
    try:
        with progress_bar(progress, -(-frames // step), f"predicting {source.path.name}") as advance:
            for result in detector.stream(source.path, every=every, fps=fps):
                outputs.add(result.plot(), result.to_dict())
                advance(1)
    finally:
        summary = outputs.close()
    return summary


def run_predict(
    ckpt: Path,
    inputs: list[str],
    *,
    out_dir: Path = Path("predictions"),
    score_thr: float | None = None,
    tile: int | None = None,
    save_labelme: bool = False,
    device: str | None = None,
    progress: bool = True,
    overrides: list[str] | None = None,
    say: Callable[[str], None] | None = None,
    every: int | None = None,
    fps: float | None = None,
) -> PredictReport:
    """`oilleak predict`: the model of an oilleak checkpoint (or of an `oilleak export` .onnx file) over the
    inputs, through :class:`~oilleak.predict.detector.Detector`. Videos (by extension) are read every
    ``every``-th frame or at about ``fps`` frames a second (:func:`predict_video`). Raises OilleakError when no image at all could be predicted (nothing found, or every one
    unreadable). ``say`` gets the notes the user needs before the (long) run: where the outputs go when
    ``out_dir`` already holds files.

    Under torchrun every rank finds the same images and predicts every world_size-th of them into the one
    output folder rank 0 chose; rank 0 joins the ranks' summary rows into summary.csv (in input order). Every
    rank returns the report of the whole run."""
    from oilleak.predict.video import is_video

    runtime = distributed.start_if_launched(device)
    sources, problems = find_images(inputs, exclude=output_folders(out_dir))
    asked = out_dir
    out_dir = distributed.from_main(fresh_dir(out_dir), runtime)  # after every rank has looked for inputs
    if out_dir != asked and say is not None and runtime.is_main:
        say(f"{asked} is not empty (oilleak never overwrites files): the outputs go to {out_dir}")
    if not sources:
        listed = "; ".join(f"{text}: {why}" for text, why in problems)
        raise OilleakError(f"no image to predict ({listed}); pass image files, videos, folders or quoted globs like 'photos/**/*.jpg'")
    detector = Detector(ckpt, runtime.device, score_thr, tile=tile, overrides=overrides)
    mine = [sources[i] for i in distributed.shard(len(sources), runtime)]
    videos = [s for s in mine if is_video(s.path)]
    images = [s for s in mine if not is_video(s.path)]
    report = predict_images(
        detector, images, out_dir, save_labelme=save_labelme,
        progress=progress and runtime.is_main, failures=problems if runtime.is_main else [],
        summary_name=f"summary.rank{runtime.rank}.csv" if runtime.distributed else "summary.csv",
    )
    for video in videos:
        summary = predict_video(detector, video, out_dir, every=every, fps=fps, progress=progress and runtime.is_main)
        report.videos.append(summary)
        report.processed += 1
    if runtime.distributed:
        report = _join_ranks(report, sources, runtime)
    distributed.stop(runtime)
    if report.processed == 0:
        listed = "\n".join(f"  {text}: {why}" for text, why in report.failures)
        raise OilleakError(f"no image could be predicted:\n{listed}\n(summary in {out_dir / 'summary.csv'})")
    return report


def _join_ranks(report: PredictReport, sources: list[Source], runtime: distributed.Runtime) -> PredictReport:
    """The whole run's report on every rank; rank 0 joins the ranks' summary files into summary.csv, rows in
    input order (inputs that gave no image first, as in one process)."""
    reports = distributed.gather((report.processed, report.instances, report.failures, report.top_score), runtime)
    position = {str(s.path): k for k, s in enumerate(sources)}  # every rank has written its files by now
    failures = sorted((f for _, _, part, _ in reports for f in part), key=lambda f: position.get(f[0], -1))
    tops = [r[3] for r in reports if r[3] is not None]
    joined = PredictReport(report.out_dir, sum(r[0] for r in reports), sum(r[1] for r in reports), failures,
                           report.score_thr, max(tops) if tops else None)
    if runtime.is_main:
        parts = [report.out_dir / f"summary.rank{rank}.csv" for rank in range(runtime.world_size)]
        files.join_summaries(parts, report.out_dir / "summary.csv", [s.name for s in sources])
    return joined
