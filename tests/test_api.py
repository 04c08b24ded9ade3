"""The Python API (``from oilleak import Detector``) on real BSData photos with the demo's trained weights:
the same instances as `oilleak predict` writes for the same files, whatever form the images come in; results
re-filtered without the model; videos from the CLI and from the API equal per-frame predictions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import oilleak
from oilleak import Detector, OilleakError, Result
from oilleak.cli import app
from oilleak.data.transforms import load_image
from oilleak.demo import demo_checkpoint
from tests.conftest import REPO

runner = CliRunner()
THR = 0.1  # low enough for the demo model to find several stains on these photos


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return demo_checkpoint(tmp_path_factory.mktemp("api") / "demo.pth")


@pytest.fixture(scope="module")
def photos(sample_dir) -> list[Path]:
    return sorted(sample_dir.glob("*.jpg"))[6:8]  # the two the demo's fine-tuning never sees (val)


@pytest.fixture(scope="module")
def detector(ckpt) -> Detector:
    return Detector(ckpt, "cpu", THR)


@pytest.fixture(scope="module")
def predicted(ckpt, photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "out"
    result = runner.invoke(app, ["predict", str(ckpt), *map(str, photos), "--out-dir", str(out),
                                 "--score-thr", str(THR), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def test_the_api_gives_exactly_what_predict_writes(detector, photos, predicted):
    results = detector(photos)
    assert [r.source for r in results] == [str(p) for p in photos]
    assert sum(len(r) for r in results) >= 2  # the trained model finds stains here
    for photo, result in zip(photos, results):
        written = json.loads((predicted / "instances" / f"{photo.stem}.json").read_text())
        assert result.to_dict() == written
        assert (result.width, result.height) == (written["width"], written["height"])


def test_save_writes_the_files_predict_writes(detector, photos, predicted, tmp_path):
    (result,) = detector(photos[0])
    paths = result.save(tmp_path)
    assert paths["instances"].read_bytes() == (predicted / "instances" / f"{photos[0].stem}.json").read_bytes()
    assert paths["overlay"].read_bytes() == (predicted / "overlays" / f"{photos[0].stem}.jpg").read_bytes()
    with pytest.raises(OilleakError, match="already exist"):  # never replaces a file
        result.save(tmp_path)
    labelme = result.save(tmp_path / "lm", labelme=True)["labelme"]
    assert json.loads(labelme.read_text())["imagePath"] == photos[0].name


def test_arrays_pil_images_folders_globs_and_lists_give_the_same_instances(detector, photos, tmp_path):
    expected = [r.to_dict()["instances"] for r in detector(photos)]
    array = load_image(photos[0])
    with Image.open(photos[1]) as pil:
        from_pil = detector(pil.copy())
    assert detector(array)[0].to_dict()["instances"] == expected[0]
    assert from_pil[0].to_dict()["instances"] == expected[1]
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos:
        (folder / p.name).write_bytes(p.read_bytes())
    assert [r.to_dict()["instances"] for r in detector(folder)] == expected
    assert [r.to_dict()["instances"] for r in detector(str(folder / "*.jpg"))] == expected
    assert [r.to_dict()["instances"] for r in detector([array, str(photos[1])])] == expected


def test_filter_equals_a_run_at_the_higher_threshold(ckpt, detector, photos):
    (low,) = detector(photos[0])
    scores = sorted(leak.score for leak in low)
    higher = scores[len(scores) // 2]  # keeps about half
    (high,) = Detector(ckpt, "cpu", higher)(photos[0])
    assert low.filter(higher).to_dict() == high.to_dict()
    assert 0 < len(low.filter(higher)) < len(low)
    with pytest.raises(OilleakError, match="run the detector with score_thr"):
        low.filter(THR / 2)  # below what the masks were computed for


def test_a_result_describes_its_leaks(detector, photos):
    (result,) = detector(photos[0])
    leak = max(result, key=lambda leak: leak.area_px)
    mask = leak.mask()
    assert mask.shape == (result.height, result.width) and mask.sum() == leak.area_px
    assert leak.area_share == pytest.approx(leak.area_px / (result.width * result.height))
    assert leak.class_name == "Pitting" and leak.label == 0 and leak.polygons
    ys, xs = np.nonzero(mask)
    x1, y1, x2, y2 = leak.box
    assert x1 - 1 <= xs.min() and xs.max() <= x2 + 1 and y1 - 1 <= ys.min() and ys.max() <= y2 + 1
    union = np.zeros_like(mask)
    for each in result:
        union |= each.mask()
    assert result.leak_area_px == union.sum() and result.leak_area_share_per_class["Pitting"] == result.leak_area_share
    overlay = result.plot()
    assert overlay.shape == (result.height, result.width, 3) and (overlay != load_image(photos[0])).any()
    assert json.loads(result.to_json()) == result.to_dict()


def test_an_mmdetection_checkpoint_of_the_same_weights_gives_the_same_leaks(ckpt, detector, photos, tmp_path):
    """mmdetection's layout (its key names are oilleak's): the classes from its dataset_meta, the model from
    ``preset``, the scale it was trained at from ``overrides`` (an mmdet file does not record it)."""
    import torch

    stored = torch.load(ckpt, weights_only=True)
    mmdet_file = tmp_path / "epoch_12.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0", "dataset_meta": {"classes": ("Pitting",)}},
                "state_dict": stored["state_dict"], "optimizer": {}}, mmdet_file)
    model = stored["config"]["model"]
    overrides = [f"model.{k}={v}" for k, v in model.items() if k != "preset"]
    overrides.append(f"data.scale=[{','.join(map(str, stored['config']['data']['scale']))}]")
    from_mmdet = Detector(mmdet_file, "cpu", THR, preset=model["preset"], overrides=overrides)
    assert from_mmdet.classes == ["Pitting"]
    assert [r.to_dict() for r in from_mmdet(photos)] == [r.to_dict() for r in detector(photos)]
    with pytest.raises(OilleakError, match=r"trained on the classes \['Pitting'\], not \['oil'\]"):
        Detector(mmdet_file, "cpu", classes=["oil"], preset=model["preset"])
    with pytest.raises(OilleakError, match="is not a htc_r50_tiny model for 1 classes .*use the model.preset"):
        Detector(mmdet_file, "cpu", preset="htc_r50_tiny")  # another model than the one it was trained as


def test_bad_inputs_name_the_input_and_the_fix(detector, tmp_path):
    with pytest.raises(OilleakError, match=re.escape(str(tmp_path / "missing.jpg")) + ": no such file"):
        detector(tmp_path / "missing.jpg")
    with pytest.raises(OilleakError, match=r"RGB \(H, W, 3\) uint8"):
        detector(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(OilleakError, match="cannot predict a dict"):
        detector({"not": "an image"})
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(OilleakError, match="cannot read image"):
        detector(broken)
    (reported,) = detector.stream(broken, errors="report")
    assert reported.error.startswith("cannot read image") and len(reported) == 0
    flash = tmp_path / "clip.flv"
    flash.write_bytes(b"FLV\x01 not supported")
    with pytest.raises(OilleakError, match=r"clip\.flv: .*\(images: BMP, JPEG, JPG, PNG, TIF, TIFF, WEBP; videos: MP4, MOV"):
        detector(flash)
    with pytest.raises(OilleakError, match="tiles must be at least 64"):
        Detector(tmp_path / "any.pth", "cpu", tile=16)
    with pytest.raises(OilleakError, match="broken.jpg is not a checkpoint: it is no PyTorch file"):
        Detector(broken, "cpu")


# --- video --------------------------------------------------------------------------------------------


def write_clip(path: Path, photos: list[Path], repeats: int = 3, fps: float = 6.0) -> Path:
    """A short MP4 of BSData photos, each shown for ``repeats`` frames."""
    frames = [cv2.resize(load_image(p), (560, 230)) for p in photos]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (560, 230))
    assert writer.isOpened()
    for frame in frames:
        for _ in range(repeats):
            writer.write(frame[..., ::-1])
    writer.release()
    return path


def decoded_frames(path: Path) -> list[np.ndarray]:
    """Every frame of the file as OpenCV decodes it, read independently of oilleak."""
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = capture.read()
        if not ok:
            return frames
        frames.append(bgr[..., ::-1].copy())


@pytest.fixture(scope="module")
def clip(tmp_path_factory, photos) -> Path:
    return write_clip(tmp_path_factory.mktemp("video") / "inspection.mp4", photos)


def test_video_from_the_cli_equals_per_image_predictions_of_its_frames(ckpt, detector, clip, tmp_path):
    frames = decoded_frames(clip)
    assert len(frames) == 6
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(ckpt), str(clip), "--out-dir", str(out), "--every", "2",
                                 "--score-thr", str(THR), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "inspection.frames.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == [0, 2, 4]
    assert [line["time_s"] for line in lines] == pytest.approx([0, 2 / 6, 4 / 6], abs=1e-3)
    expected = [detector(frames[k])[0].to_dict() for k in (0, 2, 4)]
    for line, each in zip(lines, expected):
        assert line["instances"] == each["instances"] and line["leak_area_share"] == each["leak_area_share"]
    summary = json.loads((out / "inspection.summary.json").read_text())
    assert summary["frames_predicted"] == 3
    assert summary["frames_with_leaks"] == sum(1 for each in expected if each["instances"])
    best = max(range(3), key=lambda k: expected[k]["leak_area_share"])
    assert summary["largest_leak_share_per_class"]["Pitting"]["frame"] == [0, 2, 4][best]
    overlay = cv2.VideoCapture(str(out / "inspection.overlay.mp4"))
    assert overlay.get(cv2.CAP_PROP_FRAME_COUNT) == 3 and overlay.get(cv2.CAP_PROP_FRAME_WIDTH) == 560


def test_video_from_the_api_yields_the_same_frames(detector, clip):
    frames = decoded_frames(clip)
    streamed = list(detector.stream(clip, fps=3))  # 6 fps read at 3: every 2nd frame
    assert [r.frame for r in streamed] == [0, 2, 4] and all(r.source == str(clip) for r in streamed)
    for result in streamed:
        assert result.to_dict()["instances"] == detector(frames[result.frame])[0].to_dict()["instances"]


def test_an_unreadable_video_names_the_file_and_the_formats(ckpt, detector, tmp_path):
    fake = tmp_path / "clip.mp4"
    fake.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    with pytest.raises(OilleakError, match=r"clip\.mp4: OpenCV .*MP4, MOV"):
        detector(fake)
    result = runner.invoke(app, ["predict", str(ckpt), str(fake), "--out-dir", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 2 and "the formats that work: MP4, MOV" in result.output, result.output


# --- the package and the README ---------------------------------------------------------------------------


def test_the_package_exports_a_small_typed_api():
    assert set(oilleak.__all__) == {"Detector", "Leak", "OilleakError", "Result", "__version__"}
    assert (Path(oilleak.__file__).parent / "py.typed").is_file()
    assert Result is oilleak.Result


@pytest.fixture
def workspace(ckpt, photos, clip, tmp_path, monkeypatch) -> Path:
    """What the documented examples expect in the current folder: best.pth, photos/, inspection.mp4."""
    work = tmp_path / "work"
    (work / "photos").mkdir(parents=True)
    for p in photos:
        (work / "photos" / p.name).write_bytes(p.read_bytes())
    (work / "best.pth").write_bytes(ckpt.read_bytes())
    (work / "inspection.mp4").write_bytes(clip.read_bytes())
    monkeypatch.chdir(work)
    return work


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def test_the_readme_python_example_runs(workspace, photos, capsys):
    snippet = python_blocks(REPO / "README.md")[0]  # the first screen's example
    exec(compile(snippet, "README.md", "exec"), {})
    assert (workspace / "results" / "instances" / f"{photos[0].stem}.json").is_file()
    assert f"{photos[0]}".split("/")[-1] in capsys.readouterr().out


def test_the_api_docs_examples_run_in_order(workspace):
    namespace: dict = {}
    blocks = python_blocks(REPO / "docs" / "api.md")
    assert len(blocks) >= 5
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    assert (workspace / "overlay.png").is_file() and (workspace / "results" / "labelme").is_dir()
