"""The ``oilleak`` command. Thin: parse arguments, call the function that does the work, print.

Every command turns :class:`oilleak.errors.OilleakError` into a red message and exit code 2, never a
traceback. Each command imports its implementation lazily so ``oilleak --help`` stays fast.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, NoReturn, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from oilleak.errors import OilleakError

if TYPE_CHECKING:
    from oilleak.data.labelme import ConvertReport

app = typer.Typer(
    name="oilleak",
    help="Find and outline oil leaks in substation inspection images (DetectoRS / HTC).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="override a config value, e.g. --set train.lr=0.01 (repeatable)"),
]


CfgOptions = Annotated[
    Optional[list[str]],
    typer.Option("--cfg-options", help="an mmdetection config (.py): override a key of it as mmdetection does, "
                 "e.g. --cfg-options train_dataloader.dataset.data_root=data/ (repeatable)"),
]


def load_run_config(config: Path, set_: list[str] | None, cfg_options: list[str] | None):
    """oilleak's YAML, or an mmdetection 3.x config file read as it is (printing what was taken and ignored).
    Returns the Config and, for an mmdetection file, the project (its resume / auto_scale_lr)."""
    from oilleak.distributed import launched_as_main
    from oilleak.mmdet_project import describe, is_mmdet_config, read_mmdet_project

    if is_mmdet_config(config):
        project = read_mmdet_project(config, cfg_options, set_ or [])
        if launched_as_main():  # under torchrun every rank reads the file; rank 0 shows the table
            console.print(describe(project))
        return project.config, project
    if cfg_options:
        raise OilleakError(f"--cfg-options is for mmdetection config files (.py); {config} is oilleak's YAML: use --set KEY=VALUE")
    from oilleak.config import load_config

    return load_config(config, set_ or []), None


def parse_duration(text: str) -> float:
    """Seconds from ``900``, ``900s``, ``15m`` or ``1.5h``."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    text = text.strip().lower()
    number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1.0)
    try:
        seconds = float(number) * unit
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise typer.BadParameter(f"{text!r} is not a duration; write seconds or a number with s, m or h, e.g. 900, 15m, 1.5h")
    return seconds


@app.callback()
def _startup() -> None:
    """Runs before every command: a torch/torchvision pair that cannot run the model's ops is the most
    common install problem, so say how to fix it before anything else fails obscurely."""
    from oilleak.deps import require_torchvision_ops

    try:
        require_torchvision_ops()
    except OilleakError as exc:
        _exit_with(exc)


def _exit_with(exc: OilleakError) -> NoReturn:
    # escape: messages quote file names, labels and exceptions, which may hold [brackets] rich reads as markup
    err_console.print(f"[bold red]error:[/] {escape(_own_message(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None


def _own_message(exc: OilleakError) -> str:
    """The error's message. One raised in a DataLoader worker (an image unreadable when it is loaded) comes
    back as "Caught OilleakError in DataLoader worker process 0. Original Traceback ...": only the
    traceback's last line, after the exception's name, is the message."""
    text = str(exc)
    name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    if text.startswith("Caught ") and "\nOriginal Traceback" in text and name in text:
        return text.rsplit(name, 1)[1].rstrip("\n")
    return text


def friendly_errors(func: F) -> F:
    """Run a command; bad input becomes a message and exit code 2 instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except OilleakError as exc:
            _exit_with(exc)

    return wrapper  # type: ignore[return-value]


@app.command()
@friendly_errors
def convert(
    src: Annotated[Path, typer.Argument(help="folder of labelme JSON files (searched recursively)")],
    out: Annotated[Path, typer.Argument(help="output data_root: annotations/{train,val}.json, train/, val/")],
    classes: Annotated[Optional[str], typer.Option(help="comma-separated class names; fixes ids 1..N")] = None,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.2,
    seed: int = 0,
    overwrite: Annotated[bool, typer.Option(help="write into a non-empty OUT, replacing its annotations/{train,val}.json, train/ and val/")] = False,
) -> None:
    """Convert a labelme folder into the COCO layout oilleak (and mmdetection) train on."""
    from oilleak.data.labelme import convert_labelme

    class_list = classes.split(",") if classes is not None else None
    report = convert_labelme(src, out, class_list, val_fraction=val_fraction, seed=seed, overwrite=overwrite)
    _print_convert_report(report)


def _print_convert_report(report: ConvertReport) -> None:
    """The per-split, per-class table, then the warnings grouped by kind (a few examples of each)."""
    from collections import defaultdict

    from rich.table import Table

    origin = "the sorted labels found" if report.classes_from_labels else "--classes"
    console.print(f"classes (ids 1..{len(report.classes)}, from {origin}): {escape(', '.join(report.classes))}")
    table = Table("split", "class", "images", "negatives", "instances", "multi-part", title="oilleak convert")
    for split, summary in report.splits.items():
        for name, counts in summary.classes.items():
            table.add_row(split, escape(name), str(counts.images), "", str(counts.instances), str(counts.multipart))
        totals = (str(summary.images), str(summary.negatives), str(summary.instances), "")
        table.add_row(split, "[bold]all[/]", *totals, end_section=True)
    console.print(table)
    by_kind = defaultdict(list)
    for warning in report.warnings:
        by_kind[warning.kind].append(warning)
    for kind, warnings in by_kind.items():
        console.print(f"[yellow]warning[/] {escape(kind)}: {len(warnings)}")
        for warning in warnings[:5]:
            console.print(f"  {escape(str(warning))}", highlight=False)
        if len(warnings) > 5:
            console.print(f"  ... and {len(warnings) - 5} more")
    if report.splits["val"].images == 0:
        console.print("val is empty: annotations/val.json lists no images (--val-fraction 0 puts all in train)")
    console.print(f"wrote {escape(str(report.out))}: annotations/train.json, annotations/val.json, train/, val/")


@app.command()
@friendly_errors
def check(
    config: Annotated[Path, typer.Argument(help="YAML config, or an mmdetection 3.x config file (.py)")],
    gallery: Annotated[Optional[Path], typer.Option(help="write a few images with ground truth drawn")] = None,
    set_: SetOption = None,
    cfg_options: CfgOptions = None,
) -> None:
    """Check a dataset before training: classes, images, boxes, masks, semantic maps.

    Exit code 0 when the data can be trained on (warnings allowed), 2 when it cannot."""
    from oilleak.data.check import check_dataset

    cfg, _ = load_run_config(config, set_, cfg_options)
    report = check_dataset(cfg.data, config_name=str(config))
    console.print(report.format(), markup=False, highlight=False, soft_wrap=True)
    if gallery is not None:
        from oilleak.data.gallery import write_gallery

        written = write_gallery(report, gallery)
        console.print(f"gallery: {len(written)} images written to {gallery}", markup=False, highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(2)


@app.command("convert-config")
@friendly_errors
def convert_config(
    config: Annotated[Path, typer.Argument(help="an mmdetection 3.x config file (.py), with its _base_ tree beside it")],
    out: Annotated[Path, typer.Argument(help="the oilleak YAML to write (never overwritten)")],
    set_: SetOption = None,
    cfg_options: CfgOptions = None,
) -> None:
    """Write the oilleak YAML an mmdetection config amounts to (train / test / check also read the .py directly)."""
    from oilleak.config import save_config
    from oilleak.mmdet_project import is_mmdet_config

    if not is_mmdet_config(config):
        raise OilleakError(f"{config} is not an mmdetection config file (.py)")
    if out.exists():
        raise OilleakError(f"{out} already exists; choose another name (oilleak never overwrites it)")
    cfg, project = load_run_config(config, set_, cfg_options)
    save_config(cfg, out)
    flags = " ".join(f for f, on in (("--resume", project.resume), ("--auto-scale-lr", project.auto_scale_lr)) if on)
    console.print(f"wrote {out}" + (f"; the file also asked for {flags}: pass it to oilleak train" if flags else ""),
                  markup=False, highlight=False)


@app.command()
@friendly_errors
def train(
    config: Annotated[Path, typer.Argument(help="YAML config, or an mmdetection 3.x config file (.py)")],
    work_dir: Annotated[Optional[Path], typer.Option(help="where checkpoints and logs go [default: train.work_dir]")] = None,
    load_from: Annotated[Optional[str], typer.Option(help="start from these weights: an oilleak or mmdetection checkpoint")] = None,
    backbone_weights: Annotated[Optional[str], typer.Option(help="torchvision's ImageNet ResNet-50 .pth for both ResNets")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the training in --work-dir from its latest.pth")] = False,
    resume_from: Annotated[Optional[Path], typer.Option(help="continue the training saved in this checkpoint")] = None,
    auto_scale_lr: Annotated[bool, typer.Option("--auto-scale-lr", help="scale train.lr by total batch / train.base_batch_size")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda [default: cuda when available]")] = None,
    amp: Annotated[bool, typer.Option("--amp", help="mixed precision on CUDA (ignored on CPU)")] = False,
    max_iters: Annotated[Optional[int], typer.Option(min=1, help="stop (resumably) after this many iterations")] = None,
    time: Annotated[Optional[float], typer.Option(
        "--time", parser=parse_duration, metavar="DURATION",
        help="stop (evaluated, resumable) after this much training, e.g. 900, 15m, 1.5h (train.time_budget_s); "
             "a cosine lr schedule (the default from random weights) runs over it")] = None,
    set_: SetOption = None,
    cfg_options: CfgOptions = None,
) -> None:
    """Train on one CPU or GPU; on several GPUs or nodes run it under torchrun:
    torchrun --nproc_per_node 2 -m oilleak train CONFIG [OPTIONS].

    --resume continues from WORK_DIR/latest.pth (model, optimiser, schedule, data order, RNG, best metric);
    --resume-from CKPT continues from another checkpoint; --load-from only takes the weights and starts anew.

    Models (model.preset): detectors_htc_r50 (DetectoRS, the default), htc_r50 (HTC on a plain ResNet-50
    and FPN), and their _tiny versions (the same architecture, narrow: CPU experiments, tests, the demo;
    ImageNet and COCO weight files fit only the full widths), e.g.
    --set model.preset=detectors_htc_r50_tiny --set data.scale=[640,256]."""
    from oilleak.train.loop import TrainOptions, run_training

    cfg, project = load_run_config(config, set_, cfg_options)
    if project is not None:  # mmdetection's resume=True / auto_scale_lr.enable=True do what the flags do
        resume = resume or (project.resume and resume_from is None)
        auto_scale_lr = auto_scale_lr or project.auto_scale_lr
    options = TrainOptions(
        work_dir=work_dir, load_from=load_from, backbone_weights=backbone_weights, resume=resume,
        resume_from=resume_from, auto_scale_lr=auto_scale_lr, device=device, amp=amp, max_iters=max_iters,
        time_budget_s=time, config_name=str(config),
    )
    result = run_training(cfg, options, console)
    if result.stopped_by in ("SIGINT", "SIGTERM"):
        raise typer.Exit(130 if result.stopped_by == "SIGINT" else 143)  # 128 + signal number, as shells report


@app.command("test")
@friendly_errors
def test_(
    config: Annotated[Path, typer.Argument(help="YAML config (the data, its classes and the model), or an mmdetection 3.x config file (.py)")],
    ckpt: Annotated[Path, typer.Argument(help="oilleak checkpoint, or an mmdetection one (loaded with a report)")],
    work_dir: Annotated[Optional[Path], typer.Option(help="reports go to WORK_DIR/test-TIME/ (default: train.work_dir)")] = None,
    show_dir: Annotated[Optional[Path], typer.Option(help="write ground truth beside prediction for every image here")] = None,
    out: Annotated[Optional[Path], typer.Option(help="all detections: .json (COCO results), or .pkl / .pickle (mmdetection 3.3's result pickle, as its tools/test.py --out writes)")] = None,
    split: Annotated[Optional[str], typer.Option(help="train, val or test [default: test when the config has one (an mmdetection config's test_dataloader), else val]")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="allow replacing an existing --out file or --show-dir pictures")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda when available)")] = None,
    set_: SetOption = None,
    cfg_options: CfgOptions = None,
) -> None:
    """Evaluate a checkpoint: COCO box and mask AP, per class, with reports and plots.

    The config gives the data; an oilleak checkpoint gives the model and the scale it was trained at
    (--set model.* / data.scale still win). Its classes must be the config's.

    A class without ground truth in the split is shown as "no GT", never as 0.
    When classes have _dry / _susp variants, AP with each class merged with its variants is shown too.
    Writes metrics.json, per_class.csv, report.md, PR curves and a mask-IoU confusion matrix.
    On several GPUs or nodes: torchrun --nproc_per_node N -m oilleak test CONFIG CKPT (the same reports)."""
    from oilleak.distributed import resolve_device
    from oilleak.evaluate.report import result_table
    from oilleak.evaluate.run import run_test

    cfg, _ = load_run_config(config, set_, cfg_options)
    split = split or ("test" if cfg.data.test is not None else "val")
    outcome = run_test(
        cfg, ckpt, split=split, work_dir=work_dir, show_dir=show_dir, out=out, overwrite=overwrite,
        device=resolve_device(device), on_load=lambda note: console.print(note, markup=False, highlight=False),
        config_name=str(config), overrides=set_,
    )
    if outcome is None:  # a torchrun rank other than 0: rank 0 reports
        return
    console.print(result_table(outcome.result))
    console.print(f"reports, plots: {outcome.report_dir}", markup=False, highlight=False)
    for path in outcome.written:
        if path.parent != outcome.report_dir:
            console.print(f"written: {path}", markup=False, highlight=False)


@app.command()
@friendly_errors
def predict(
    ckpt: Annotated[Path, typer.Argument(help="oilleak checkpoint (it carries the classes and the model), or a .onnx file from `oilleak export` (run by ONNX Runtime on the CPU)")],
    inputs: Annotated[list[str], typer.Argument(help="image files, videos (.mp4, .mov, .avi, .mkv, ...), folders (searched recursively) or quoted globs")],
    out_dir: Annotated[Path, typer.Option(help="output folder; a non-empty one is kept and OUT_DIR-2, -3, ... used")] = Path("predictions"),
    score_thr: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="keep instances scoring at least this (default: the checkpoint's predict.score_thr, 0.3)")] = None,
    save_labelme: Annotated[bool, typer.Option("--save-labelme", help="also write OUT_DIR/labelme/: labelme files + image copies, ready for `oilleak convert`")] = False,
    tile: Annotated[Optional[int], typer.Option(min=64, help="predict very large images in SIZE x SIZE tiles (20% overlap) and merge")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda when available)")] = None,
    every: Annotated[Optional[int], typer.Option(min=1, help="videos: predict every N-th frame (default: every frame)")] = None,
    fps: Annotated[Optional[float], typer.Option(min=0.001, help="videos: predict about F frames a second instead")] = None,
    set_: SetOption = None,
) -> None:
    """Predict images and videos: overlays, instance JSON files, summary.csv, optional labelme files.

    A video gives NAME.overlay.mp4, NAME.frames.jsonl (one line per predicted frame) and NAME.summary.json
    (frames with leaks, the largest leak share per class and when).

    Unreadable images are listed and skipped; exit code 0 when at least one image was predicted.
    --set changes the checkpoint's stored config for this run, e.g. --set data.scale=[2000,1200].
    On several GPUs or nodes: torchrun --nproc_per_node N -m oilleak predict CKPT INPUTS (images split between them)."""
    from oilleak.predict.predictor import run_predict
    from oilleak.distributed import launched_as_main

    report = run_predict(ckpt, inputs, out_dir=out_dir, score_thr=score_thr, tile=tile, save_labelme=save_labelme,
                         device=device, overrides=set_, every=every, fps=fps,
                         say=lambda note: console.print(note, markup=False, highlight=False, soft_wrap=True))
    if not launched_as_main():  # a torchrun rank other than 0: rank 0 reports the whole run
        return
    from oilleak.predict.files import nothing_found

    for video in report.videos:
        console.print(f"{video['source']}: {video['frames_predicted']} frames predicted, {video['frames_with_leaks']} "
                      "with leaks (NAME.overlay.mp4, NAME.frames.jsonl, NAME.summary.json)", markup=False, highlight=False)
    images = report.processed - len(report.videos)
    if images or not report.videos:
        found = f"{report.instances} instances" if report.instances else nothing_found(report.score_thr, report.top_score)
        console.print(f"{images} images predicted, {found}; outputs in {report.out_dir}", markup=False, highlight=False)
    else:
        console.print(f"outputs in {report.out_dir}", markup=False, highlight=False)
    if report.failures:
        err_console.print(f"[yellow]{len(report.failures)} inputs skipped:[/]", highlight=False)
        for text, reason in report.failures:
            err_console.print(f"  {escape(text)}: {escape(reason)}", highlight=False, soft_wrap=True)


@app.command()
@friendly_errors
def export(
    ckpt: Annotated[Path, typer.Argument(help="oilleak checkpoint")],
    out: Annotated[Path, typer.Argument(help="the .onnx file to write (never overwritten)")],
    opset: Annotated[int, typer.Option(help="ONNX opset; DetectoRS' deformable convolutions need 19")] = 19,
    dynamic: Annotated[bool, typer.Option("--dynamic/--static", help="any image size (default), or fixed to the preset's scale")] = True,
    fp16: Annotated[bool, typer.Option("--fp16", help="float16 weights and layers: half the file, meant for GPU providers (no faster on the CPU); box steps, NMS and deformable convolutions stay float32, inputs and outputs unchanged")] = False,
) -> None:
    """Export the whole detector (RPN, three cascade stages, mask information flow, semantic branch) to ONNX.

    The file takes the photo resized to the preset's scale as (H, W, 3) uint8 RGB and gives boxes, scores,
    labels and 28x28 mask probabilities; `oilleak predict OUT.onnx IMAGES` runs it with ONNX Runtime.
    With --fp16 the weights are float16 and so are the backbone, feature pyramid and heads; anchors, box
    decoding, NMS, score thresholds, RoIAlign and the deformable convolutions compute in float32, and the
    inputs and outputs keep their types (metadata oilleak.precision says which file it is)."""
    from oilleak.export.onnx_export import export_checkpoint

    report = export_checkpoint(ckpt, out, opset=opset, dynamic=dynamic, fp16=fp16)
    console.print(f"wrote {report.path} (opset {report.opset}{', float16' if fp16 else ''}, {report.size_bytes / 1e6:.1f} MB, {report.seconds:.0f} s)",
                  markup=False, highlight=False)


@app.command()
@friendly_errors
def parity(
    fixture: Annotated[Path, typer.Argument(help="an mmdet parity fixture (.pt), e.g. ../shared/fixtures/mmdet/htc_small.pt")],
    threads: Annotated[int, typer.Option(min=1, help="CPU threads; float32 fixtures were made with 2 (their sums follow the count), float64 ones match at any count")] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (TF32 is switched off for the run)")] = "cpu",
) -> None:
    """Check oilleak against mmdetection 3.3, stage by stage and end to end, on a parity fixture, in the
    dtype the fixture was computed in (the _f64 fixtures prove end-to-end parity on any machine).

    Exit code 0 when every check passes, 1 when one fails, 2 when the fixture cannot be used."""
    from oilleak.distributed import resolve_device
    from oilleak.parity import print_report, run_parity

    report = run_parity(fixture, threads=threads, device=resolve_device(device))
    print_report(report, console)
    if not report.passed:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def serve(
    ckpt: Annotated[Path, typer.Argument(help="oilleak checkpoint (it carries the classes and the model), or an `oilleak export` .onnx file")],
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda when available)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="inference threads")] = 1,
    queue: Annotated[int, typer.Option(min=1, help="images that may wait for a worker; beyond: 503 with Retry-After")] = 8,
    max_batch: Annotated[int, typer.Option(min=1, help="run up to this many waiting images as one batch (GPU)")] = 1,
    batch_wait_ms: Annotated[float, typer.Option(min=0.0, help="how long a worker waits to fill a batch")] = 10.0,
    max_upload_mb: Annotated[float, typer.Option(min=0.01, help="largest image file accepted (413 above)")] = 20.0,
    max_pixels: Annotated[int, typer.Option(min=1, help="largest width x height accepted, checked before decoding (413 above)")] = 50_000_000,
    pixel_budget_mp: Annotated[float, typer.Option(min=0.000001, help="megapixels decoded and not yet answered, all requests together (503 beyond)")] = 200.0,
    max_requests: Annotated[int, typer.Option(min=1, help="/predict requests inside the server at once (503 beyond)")] = 32,
    max_passes: Annotated[int, typer.Option(min=1, help="model passes per request: 1 per photo, or its tiles with ?tile= (422 beyond)")] = 100,
    grace_s: Annotated[float, typer.Option(min=0.0, help="after SIGTERM, how long the work in flight may take; then the rest gets 503")] = 30.0,
    cors_origin: Annotated[Optional[list[str]], typer.Option(help="an origin whose pages may call the API (repeat it; default: same origin only)")] = None,
    set_: SetOption = None,
) -> None:
    """Serve the model over HTTP: POST /predict, /predict/batch, GET /health, /classes, /openapi.json, and a page at /.

    Set OILLEAK_API_KEY to require that key in the X-API-Key header of /predict and /classes calls (and to see
    more than ready/uptime on /health). SIGTERM answers the requests in flight within --grace-s, refuses new
    ones, then exits."""
    import os

    from oilleak.distributed import resolve_device
    from oilleak.serve.server import run_server
    from oilleak.serve.settings import ServeSettings

    settings = ServeSettings(workers=workers, queue=queue, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                             max_upload_mb=max_upload_mb, max_pixels=max_pixels, pixel_budget_mp=pixel_budget_mp,
                             max_requests=max_requests, max_passes=max_passes, grace_s=grace_s,
                             cors_origins=tuple(cors_origin or ()), api_key=os.environ.get("OILLEAK_API_KEY") or None)
    run_server(ckpt, host=host, port=port, device=resolve_device(device), settings=settings, overrides=set_,
               on_ready=lambda line: console.print(line, markup=False, highlight=False))


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="output folder (an earlier demo's output there is replaced)")] = Path("demo_output"),
    sample: Annotated[Optional[Path], typer.Option(help="labelme folder to use instead of the bundled sample/bsdata")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda [default: cuda when available]")] = None,
) -> None:
    """The whole pipeline on the bundled sample in a few minutes on a CPU: convert, check, train a tiny
    DetectoRS briefly, evaluate it, and write prediction overlays."""
    from oilleak.demo import prepare_output, sample_dir, trained_checkpoint, weights_story, write_demo_config

    source = sample_dir(sample)
    prepare_output(out)
    steps = ("convert the labelme sample", "check the dataset", "fine-tune the demo's tiny DetectoRS (configs/demo.yaml)",
             "evaluate it on the val split", "predict the val images")
    step = iter(f"[bold]demo {i}/{len(steps)}[/]: {s}" for i, s in enumerate(steps, 1))
    console.rule(next(step))
    convert(source, out / "data", classes="Pitting" if sample is None else None, val_fraction=0.2, seed=0, overwrite=False)
    config = write_demo_config(out)
    console.rule(next(step))
    check(config, gallery=out / "gallery", set_=None)
    console.rule(next(step))
    train(config, work_dir=None, load_from=None, backbone_weights=None, resume=False, resume_from=None,
          auto_scale_lr=False, device=device, amp=False, max_iters=None, time=None, set_=None)
    checkpoint = trained_checkpoint(out / "train")
    console.rule(next(step))
    test_(config, checkpoint, work_dir=out / "test", show_dir=out / "test" / "show", out=None, split="val",
          overwrite=False, device=device, set_=None)
    console.rule(next(step))
    predict(checkpoint, [str(out / "data" / "val")], out_dir=out / "predictions", score_thr=None, save_labelme=True,
            tile=None, device=device, set_=None)
    console.rule("[bold]demo done")
    console.print(
        f"Everything is in {out}: data/ (COCO layout), gallery/ (ground truth), train/ (checkpoints, log.jsonl, "
        "loss_curve.png), test/ (metrics, PR curves, confusion matrix, ground truth beside prediction), "
        "predictions/ (overlays, instance JSON, summary.csv, labelme files).\n" + weights_story(),
        markup=False, highlight=False,
    )


def spread_cfg_options(argv: list[str]) -> list[str]:
    """mmdetection's spelling, ``--cfg-options a=1 b=2``, as ``--cfg-options a=1 --cfg-options b=2``: the
    KEY=VALUE words after it, up to the next option, each become one (a click option takes one value)."""
    out, spreading = [], False
    for word in argv:
        if word == "--cfg-options":
            spreading = True
            continue
        if spreading and "=" in word and not word.startswith("-"):
            out += ["--cfg-options", word]
            continue
        spreading = False
        out.append(word)
    return out


def main() -> None:
    """The console script and ``python -m oilleak``."""
    import sys

    sys.argv[1:] = spread_cfg_options(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
