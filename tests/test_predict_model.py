"""`oilleak predict` with the real model: an untrained detectors_htc_r50_tiny saved with save_checkpoint,
run on the bundled sample and on BSData images; the labelme round trip; a tiled run; the CLI's exit codes.
Its frozen BatchNorms get statistics from two sample images first (`calibrate_frozen_batchnorm`, what
training from random weights does), so its ~100 random instances per image have varied scores (~0.5-0.7)
instead of all saturating at 1.0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from typer.testing import CliRunner

from oilleak.cli import app
from oilleak.config import config_from_dict
from oilleak.data.labelme import convert_labelme
from oilleak.data.transforms import load_image, pad_batch, prepare_image
from oilleak.train.from_scratch import calibrate_frozen_batchnorm
from oilleak.predict.instances import fill_holes
from oilleak.predict.backends import load_backend
from oilleak.predict.detector import Detector
from oilleak.predict.predictor import find_images, predict_images, run_predict
from oilleak.predict.tiling import tile_windows
from oilleak.models.checkpoint import save_checkpoint
from oilleak.models.presets import build_model

SCALE = (512, 320)  # small inputs keep the CPU tests quick; the architecture is the real one
SAMPLE = Path(__file__).resolve().parents[1] / "sample" / "bsdata"  # as conftest.SAMPLE


def tiny_checkpoint(path, classes, data_root="data"):
    """An untrained tiny DetectoRS (BatchNorm statistics from two sample images) saved as an oilleak checkpoint."""
    config = config_from_dict({
        "data": {"data_root": str(data_root), "classes": list(classes), "scale": list(SCALE), "workers": 0},
        "model": {"preset": "detectors_htc_r50_tiny"},
    })
    torch.manual_seed(0)
    model = build_model(config.model, len(classes))
    images = sorted(SAMPLE.glob("*.jpg"))[:2]
    calibrate_frozen_batchnorm(model, [pad_batch([prepare_image(load_image(p), SCALE)[0]])[0] for p in images])
    save_checkpoint(path, model=model, config=config)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth", ["Pitting"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, sample_dir, bsdata_dir):
    """Two bundled sample images and one BSData image, in two folders."""
    root = tmp_path_factory.mktemp("inputs")
    for src, folder in [(sorted(sample_dir.glob("*.jpg"))[2], "sample"), (sorted(sample_dir.glob("*.jpg"))[3], "sample"),
                        (sorted(bsdata_dir.glob("*.jpg"))[40], "bsdata")]:
        (root / folder).mkdir(exist_ok=True)
        shutil.copy(src, root / folder / src.name)
    return root


class Recording:
    """The real model's backend, keeping what it returned per image (to compare with the files written)."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []
        self.classes, self.scale, self.score_thr = backend.classes, backend.scale, backend.score_thr
        self.device, self.batched, self.info = backend.device, backend.batched, backend.info

    def __call__(self, images, min_score):
        answers = self.backend(images, min_score)
        self.calls += [(image.shape, found.instances) for image, found in zip(images, answers)]
        return answers


def recording_detector(ckpt, score_thr, tile=None) -> tuple[Detector, Recording]:
    recording = Recording(load_backend(ckpt, torch.device("cpu")))
    return Detector.from_backend(recording, score_thr, tile=tile), recording


@pytest.fixture(scope="module")
def predicted(ckpt, inputs, tmp_path_factory):
    detector, recording = recording_detector(ckpt, 0.0)
    sources, problems = find_images([str(inputs)])
    out = tmp_path_factory.mktemp("pred") / "out"
    report = predict_images(detector, sources, out, save_labelme=True, progress=False)
    return report, recording, sources


def test_untrained_tiny_model_gives_detections_on_real_images(predicted):
    report, recording, sources = predicted
    assert report.processed == 3 and not report.failures
    for source, (shape, instances) in zip(sources, recording.calls):
        record = json.loads((report.out_dir / "instances" / f"{source.name}.json").read_text())
        assert (record["height"], record["width"]) == shape[:2] == load_image(source.path).shape[:2]
        assert len(record["instances"]) == len(instances) > 0
        for inst, written in zip(instances, record["instances"]):
            x1, y1, x2, y2 = written["box"]
            assert 0 <= x1 <= x2 <= shape[1] and 0 <= y1 <= y2 <= shape[0]
            assert written["area_px"] == fill_holes(inst).area >= inst.area > 0 and written["polygons"]
        with Image.open(report.out_dir / "overlays" / f"{source.name}.jpg") as im:
            assert (im.height, im.width) == shape[:2]
    assert (report.out_dir / "summary.csv").read_text().count("\n") == 4


def test_labelme_round_trip_through_convert(predicted, tmp_path):
    """predict -> labelme files -> `oilleak convert` -> COCO masks match the predicted masks (as written:
    holes filled, see instances.fill_holes)."""
    report, recording, sources = predicted
    coco_root = tmp_path / "coco"
    convert_labelme(report.out_dir / "labelme", coco_root, classes=["Pitting"], val_fraction=0.0)
    coco = COCO(str(coco_root / "annotations" / "train.json"))
    assert len(coco.imgs) == 3
    checked = 0
    for source, (shape, instances) in zip(sources, recording.calls):
        (image_id,) = [i for i, im in coco.imgs.items() if im["file_name"].endswith(source.name.split("/")[-1] + ".jpg")]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(anns) == len(instances)
        converted = [coco.annToRLE(a) for a in anns]
        for inst in instances:
            mask = np.asfortranarray(fill_holes(inst).full_mask(*shape[:2]).astype(np.uint8))
            ious = mask_util.iou([mask_util.encode(mask)], converted, [0] * len(converted))
            assert ious.max() >= 0.9, f"{source.name}: an instance lost its shape in the round trip"
            checked += 1
    assert checked >= 3


def test_tiled_run_with_the_real_model(ckpt, bsdata_dir, tmp_path):
    image_path = sorted(bsdata_dir.glob("*.jpg"))[40]
    height, width = load_image(image_path).shape[:2]
    detector, recording = recording_detector(ckpt, 0.3, tile=512)
    sources, _ = find_images([str(image_path)])
    report = predict_images(detector, sources, tmp_path / "out", progress=False)
    windows = tile_windows(height, width, 512)
    assert len(windows) > 1 and [c[0][:2] for c in recording.calls] == [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in windows]
    record = json.loads((tmp_path / "out" / "instances" / f"{sources[0].name}.json").read_text())
    assert report.processed == 1 and record["instances"]
    pieces = sum(len(c[1]) for c in recording.calls)
    assert len(record["instances"]) <= pieces  # merged across tiles, never more
    for inst in record["instances"]:
        x1, y1, x2, y2 = inst["box"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height  # back in full-image pixels


runner = CliRunner()


def test_cli_predict_exit_codes(ckpt, sample_dir, tmp_path):
    good = sorted(sample_dir.glob("*.jpg"))[4]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    out = tmp_path / "predictions"
    result = runner.invoke(app, ["predict", str(ckpt), str(good), str(broken), "--out-dir", str(out), "--device", "cpu",
                                 "--tile", "600", "--save-labelme"])
    assert result.exit_code == 0, result.output
    assert "1 images predicted" in result.output and "broken.jpg" in result.output
    assert (out / "overlays" / f"{good.stem}.jpg").is_file() and (out / "labelme" / f"{good.stem}.json").is_file()
    # a second run never touches the first one's files
    before = (out / "summary.csv").read_bytes()
    result = runner.invoke(app, ["predict", str(ckpt), str(broken), "--out-dir", str(out)])
    assert result.exit_code == 2 and "no image could be predicted" in result.output
    assert (out / "summary.csv").read_bytes() == before
    result = runner.invoke(app, ["predict", str(ckpt), str(tmp_path / "nothing-here")])
    assert result.exit_code == 2 and "no such file or folder" in result.output
    result = runner.invoke(app, ["predict", str(tmp_path / "missing.pth"), str(good)])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert "Traceback" not in result.output


def test_run_predict_thresholds_and_fresh_folder(ckpt, sample_dir, tmp_path):
    image = sorted(sample_dir.glob("*.jpg"))[5]
    notes: list[str] = []
    runs = [run_predict(ckpt, [str(image)], out_dir=tmp_path / "p", score_thr=thr, device="cpu", progress=False,
                        say=notes.append) for thr in (0.0, None, 0.6)]
    assert [r.out_dir for r in runs] == [tmp_path / "p", tmp_path / "p-2", tmp_path / "p-3"]  # earlier files stay
    assert notes == [f"{tmp_path / 'p'} is not empty (oilleak never overwrites files): the outputs go to {tmp_path / f'p-{n}'}"
                     for n in (2, 3)]  # said before predicting, not only in the closing line
    records = [json.loads((r.out_dir / "instances" / f"{image.stem}.json").read_text()) for r in runs]
    assert [r["score_thr"] for r in records] == [0.0, 0.3, 0.6]  # None: the checkpoint's predict.score_thr
    for record, thr in zip(records, (0.0, 0.3, 0.6)):
        assert all(i["score"] >= thr for i in record["instances"])
    assert len(records[0]["instances"]) > len(records[2]["instances"])


def test_nothing_above_the_threshold_is_said_with_the_highest_score(ckpt, sample_dir, tmp_path):
    image = sorted(sample_dir.glob("*.jpg"))[5]
    result = runner.invoke(app, ["predict", str(ckpt), str(image), "--out-dir", str(tmp_path / "p"),
                                 "--score-thr", "1.0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split())
    top = float(line.split("no leak found at score >= 1 (highest score ")[1].split(")")[0])
    assert "1 images predicted, no leak found" in line and 0.0 < top < 1.0
    # the untrained model's best detection, kept at threshold 0: the same highest score
    report = run_predict(ckpt, [str(image)], out_dir=tmp_path / "q", score_thr=0.0, device="cpu", progress=False)
    scores = [i["score"] for i in json.loads((report.out_dir / "instances" / f"{image.stem}.json").read_text())["instances"]]
    assert report.top_score == pytest.approx(max(scores), abs=1e-5) and round(max(scores), 2) == top  # json: 5 decimals


def test_set_changes_the_stored_config_for_one_run(ckpt, sample_dir, tmp_path):
    image = sorted(sample_dir.glob("*.jpg"))[5]
    report = run_predict(ckpt, [str(image)], out_dir=tmp_path / "p", score_thr=0.0, device="cpu", progress=False,
                         overrides=["model.max_per_img=3"])
    record = json.loads((report.out_dir / "instances" / f"{image.stem}.json").read_text())
    assert len(record["instances"]) == 3  # the untrained model gives 100 at score 0 without the override
    report = run_predict(ckpt, [str(image)], out_dir=tmp_path / "q", device="cpu", progress=False,
                         overrides=["predict.score_thr=0.6"])
    assert json.loads((report.out_dir / "instances" / f"{image.stem}.json").read_text())["score_thr"] == 0.6
    result = runner.invoke(app, ["predict", str(ckpt), str(image), "--out-dir", str(tmp_path / "r"),
                                 "--set", "data.classes=[oil]"])
    assert result.exit_code == 2 and "cannot change data.classes" in result.output
    result = runner.invoke(app, ["predict", str(ckpt), str(image), "--set", "model.max_per_imgs=3"])
    assert result.exit_code == 2 and "did you mean 'model.max_per_img'" in result.output


def test_torchrun_two_ranks_write_what_one_process_writes(ckpt, sample_dir, tmp_path):
    """`oilleak predict` under torchrun on 2 CPU processes (gloo): the images are split between the ranks,
    every file is written once, and the folder equals one process's (one thread each: equal float sums)."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "in"
    folder.mkdir()
    for src in sorted(sample_dir.glob("*.jpg"))[6:9]:
        shutil.copy(src, folder / src.name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")  # sorted last: a failure on rank 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_predict(ckpt, [str(folder), str(tmp_path / "missing")], out_dir=tmp_path / "one", score_thr=0.0,
                          device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "oilleak",
           "predict", str(ckpt), str(folder), str(tmp_path / "missing"), "--out-dir", str(tmp_path / "two"),
           "--score-thr", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("3 images predicted") == 1  # the whole run, reported by rank 0 only
    assert one.processed == 3 and len(one.failures) == 2
    written = {p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file()}
    assert {p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file()} == written
    for path in written:
        if path.suffix != ".jpg":  # summary.csv (one row per input, in input order) and instances/*.json
            assert (tmp_path / "two" / path).read_text() == (tmp_path / "one" / path).read_text(), path
    rows = (tmp_path / "two" / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 and "missing" in rows[1] and "broken.jpg" in rows[5]
