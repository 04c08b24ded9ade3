"""`oilleak export` and running the .onnx file with ONNX Runtime (`oilleak predict MODEL.onnx`).

The model is an untrained tiny DetectoRS (the real architecture: SAC's deformable convolutions, RFP, three
cascade stages, mask information flow, semantic branch) whose frozen BatchNorms get statistics from two
sample images, at a small scale so the export stays quick. A random DetectoRS has near-tied scores, so the
check that holds for it is step by step: every step of the PyTorch model run on what the ONNX graph fed
the same step (``oilleak.export.agreement``). The float16 file is checked end to end on the shipped demo
weights (a briefly trained tiny model, whose detections are far apart in score), and so is any export by
``bench/export_agreement.py`` (numbers in BENCHMARKS.md).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from oilleak.cli import app
from oilleak.config import config_from_dict
from oilleak.data.rescale import rescale_size
from oilleak.data.transforms import load_image, normalize, pad_batch, prepare_image
from oilleak.train.from_scratch import calibrate_frozen_batchnorm
from oilleak.export import postprocess
from oilleak.demo import demo_checkpoint
from oilleak.export.agreement import FP16_SCORE_DIFF, MAX_SCORE_DIFF, MIN_BOX_IOU, Agreement, StageErrors, compare, stage_errors
from oilleak.export.onnx_export import export_checkpoint, file_sha256
from oilleak.export.onnx_runtime import OnnxModel
from oilleak.predict.detector import Detector
from oilleak.models.checkpoint import model_from_checkpoint, save_checkpoint
from oilleak.models.mask_head import paste_masks
from oilleak.models.presets import build_model
from tests.conftest import REPO

SCALE = (320, 192)
runner = CliRunner()


def random_checkpoint(path, sample_dir, preset="detectors_htc_r50_tiny", calibrate=True):
    config = config_from_dict({
        "data": {"data_root": "data", "classes": ["Pitting"], "scale": list(SCALE), "workers": 0},
        "model": {"preset": preset},
    })
    torch.manual_seed(0)
    model = build_model(config.model, 1)
    if calibrate:
        images = sorted(sample_dir.glob("*.jpg"))[:2]
        calibrate_frozen_batchnorm(model, [pad_batch([prepare_image(load_image(p), SCALE)[0]])[0] for p in images])
    save_checkpoint(path, model=model, config=config)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sample_dir):
    folder = tmp_path_factory.mktemp("export")
    ckpt = random_checkpoint(folder / "tiny.pth", sample_dir)
    report = export_checkpoint(ckpt, folder / "tiny.onnx", stages=True)
    return ckpt, report.path


def test_every_step_agrees_with_pytorch_on_real_images(exported, sample_dir):
    ckpt, onnx_path = exported
    model, _ = model_from_checkpoint(ckpt)
    onnx_model = OnnxModel(onnx_path)
    errors = StageErrors()
    for path in sorted(sample_dir.glob("*.jpg"))[2:4]:
        stage_errors(model, onnx_model, load_image(path), errors)
    assert {"p2", "p6", "s0.cls", "s2.deltas", "masks"} <= set(errors.errors)
    for name in errors.errors:
        assert errors.relative(name) < 1e-3, (name, errors.errors[name], errors.scales[name])


def agreement_on_two_photos(ckpt, onnx_path, sample_dir, max_score_diff: float = MAX_SCORE_DIFF) -> Agreement:
    """The checkpoint's leaks against the file's on two sample photos, both through the Python API (the path
    `oilleak predict` and `oilleak serve` take), every score kept."""
    photos = sorted(sample_dir.glob("*.jpg"))[6:8]
    total = Agreement()
    for ref, got in zip(Detector(ckpt, "cpu", 0.0)(photos), Detector(onnx_path, "cpu", 0.0)(photos)):
        assert ref.source == got.source
        total.add(compare(ref, got, MIN_BOX_IOU, max_score_diff))
    return total


def test_detections_agree_with_pytorch_end_to_end(exported, sample_dir):
    """The issue's criterion: >= 99% of detections matched (same label, box IoU >= 0.99, score within 1e-3),
    matched masks with IoU >= 0.98. The calibrated random model's scores are varied enough for it."""
    total = agreement_on_two_photos(*exported, sample_dir)
    assert total.torch_detections > 50
    assert total.matched_fraction >= 0.99, (total.matched, total.torch_detections, total.onnx_detections)
    assert total.masks_at_least(0.98) >= 0.99


@pytest.fixture(scope="module")
def exported_fp16(tmp_path_factory):
    """The demo weights exported by `oilleak export --fp16`."""
    folder = tmp_path_factory.mktemp("export_fp16")
    ckpt = demo_checkpoint(folder / "demo.pth")
    out = folder / "demo_fp16.onnx"
    result = runner.invoke(app, ["export", str(ckpt), str(out), "--fp16"])
    assert result.exit_code == 0 and "float16" in result.output, result.output
    return ckpt, out


def test_fp16_file_has_float16_weights_and_the_same_inputs_and_outputs(exported, exported_fp16):
    import onnx
    from onnx import TensorProto

    weights = onnx.load(exported_fp16[1]).graph.initializer
    assert {w.data_type for w in weights} & {TensorProto.FLOAT, TensorProto.FLOAT16} == {TensorProto.FLOAT16}
    fp32, fp16 = OnnxModel(exported[1]), OnnxModel(exported_fp16[1])

    def inputs_and_outputs(model):  # the float32 file also has the step outputs: the first four are the detections
        return [(value.name, value.type) for value in model.session.get_inputs() + model.session.get_outputs()[:4]]

    assert inputs_and_outputs(fp16) == inputs_and_outputs(fp32) == [
        ("image", "tensor(uint8)"), ("boxes", "tensor(float)"), ("scores", "tensor(float)"),
        ("labels", "tensor(int64)"), ("masks", "tensor(float)"),
    ]
    assert fp16.metadata["oilleak.precision"] == "float16" and fp32.metadata["oilleak.precision"] == "float32"


def test_fp16_detections_agree_with_pytorch(exported_fp16, sample_dir):
    """>= 90% of PyTorch's detections matched by the float16 file (same label, box IoU >= 0.99, score within
    1e-2; PyTorch stands for the float32 file, which matches it to float32 rounding), matched masks at IoU >= 0.95.
    Measured: 97% matched; a conversion whose box steps round to float16 matched 33%."""
    total = agreement_on_two_photos(*exported_fp16, sample_dir, max_score_diff=FP16_SCORE_DIFF)
    assert total.torch_detections > 50
    assert total.matched_fraction >= 0.9, (total.matched, total.torch_detections, total.onnx_detections)
    assert total.masks_at_least(0.95) >= 0.99


def test_predict_runs_the_fp16_file(exported_fp16, sample_dir, tmp_path):
    image = sorted(sample_dir.glob("*.jpg"))[6]
    result = runner.invoke(app, ["predict", str(exported_fp16[1]), str(image), "--out-dir", str(tmp_path / "pred"), "--score-thr", "0.05"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "pred" / "instances" / f"{image.stem}.json").read_text())["instances"]


def test_metadata_names_classes_scale_and_checkpoint(exported):
    ckpt, onnx_path = exported
    meta = OnnxModel(onnx_path).metadata
    assert json.loads(meta["oilleak.classes"]) == ["Pitting"]
    assert json.loads(meta["oilleak.scale"]) == list(SCALE)
    assert meta["oilleak.preset"] == "detectors_htc_r50_tiny"
    assert meta["oilleak.checkpoint_sha256"] == file_sha256(ckpt)
    assert json.loads(meta["oilleak.mean"]) == [123.675, 116.28, 103.53]


def test_any_image_size_goes_in(exported):
    """Dynamic height and width, padded to /32 inside the graph: odd sizes and a portrait image run."""
    _, onnx_path = exported
    model = OnnxModel(onnx_path)
    rng = np.random.default_rng(0)
    for height, width in [(101, 187), (192, 97)]:
        boxes, scores, labels, masks = model.raw(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        assert boxes.shape == (len(scores), 4) and masks.shape == (len(scores), 28, 28)
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all() and (boxes >= 0).all()
        assert (np.diff(scores) <= 0).all()


def test_predict_runs_the_onnx_file(exported, sample_dir, tmp_path):
    _, onnx_path = exported
    images = sorted(sample_dir.glob("*.jpg"))[4:6]
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", str(onnx_path), *map(str, images), "--out-dir", str(out), "--score-thr", "0.05"])
    assert result.exit_code == 0, result.output
    for path, expected in zip(images, Detector(onnx_path, score_thr=0.05)(images)):
        record = json.loads((out / "instances" / f"{path.stem}.json").read_text())
        assert record == expected.to_dict() and len(expected) > 0
        assert (out / "overlays" / f"{path.stem}.jpg").is_file()
    assert (out / "summary.csv").is_file()


def test_serve_runs_the_onnx_file(exported, sample_dir, tmp_path):
    import httpx
    from serve_process import ServerProcess

    _, onnx_path = exported
    image = sorted(sample_dir.glob("*.jpg"))[4]
    server = ServerProcess(onnx_path, tmp_path / "serve.log", small_scale=False)
    try:
        health = httpx.get(server.url + "/health", timeout=30).json()
        answer = httpx.post(server.url + "/predict", params={"score_thr": 0.05}, timeout=300,
                            files={"image": (image.name, image.read_bytes(), "image/jpeg")})
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text
    assert health["model"]["classes"] == ["Pitting"] and health["model"]["checkpoint"] == onnx_path.name
    (expected,) = Detector(onnx_path, score_thr=0.05)(image)
    got = answer.json()["instances"]
    assert len(got) == len(expected) > 0
    assert got == expected.to_dict()["instances"]


def test_numpy_paste_equals_the_models_paste():
    rng = np.random.default_rng(1)
    probs = rng.random((6, 28, 28), dtype=np.float32)
    boxes = np.array([[10.3, 5.7, 60.2, 40.9], [0, 0, 99, 79], [50.5, 60.5, 50.5, 70], [-3, -2, 20, 15],
                      [90.1, 70.2, 130, 95], [33, 33, 34, 34]], np.float32)
    expected = paste_masks(torch.from_numpy(probs), torch.from_numpy(boxes), (80, 100), 0.5).numpy()
    for i in range(len(boxes)):
        window, origin = postprocess.paste_mask(probs[i], boxes[i], (80, 100), 0.5)
        np.testing.assert_array_equal(postprocess.full_mask(window, origin, (80, 100)), expected[i])


def _exact_scale(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The resize factor as a fraction (num, den): the long rule or the short rule, whichever is smaller."""
    long_rule, short_rule = (max(scale), max(width, height)), (min(scale), min(width, height))
    return long_rule if long_rule[0] * short_rule[1] <= short_rule[0] * long_rule[1] else short_rule


def _rounding_ties(scale: tuple[int, int], max_side: int) -> tuple[list, list]:
    """(w, h, scale) up to ``max_side`` whose resized w or h is exactly k + 1/2 before rounding (integer
    arithmetic): those float rounds up as exact arithmetic does, and those it rounds down (149 x 298 at
    1333 x 800: 666.4999.. -> 666, as mmcv's float arithmetic does too)."""
    up, down = [], []
    for w in range(1, max_side + 1):
        for h in range(1, max_side + 1):
            num, den = _exact_scale(w, h, scale)
            if any((2 * side * num) % (2 * den) == den for side in (w, h)):
                exact = tuple((2 * side * num + den) // (2 * den) for side in (w, h))
                (up if rescale_size(w, h, scale) == exact else down).append((w, h, scale))
    return up, down


def _size_cases() -> list[tuple[int, int, tuple[int, int]]]:
    """BSData and fixture sizes, images already at the scale, squares, 1-pixel sides, both scale orders,
    rounding ties up to 320 px (25 of the exact ones per scale, every one float rounds down) and a random sweep."""
    cases = [(w, h, (1333, 800)) for w, h in [(1130, 460), (1540, 645), (2700, 901), (37, 1000), (1333, 800),
                                              (800, 1333), (800, 480), (500, 500), (1, 1), (1, 300), (300, 1)]]
    cases += [(2793, 863, (698, 224)), (100, 50, (800, 1333)), (64, 48, SCALE), (7, 5, (512, 512))]
    rounded_down = 0
    for scale in [(1333, 800), (698, 224), SCALE]:
        up, down = _rounding_ties(scale, 320)
        cases += up[:: max(len(up) // 25, 1)] + down
        rounded_down += len(down)
    assert rounded_down >= 10  # 149 x 298 at 1333 x 800, 37 x 148 at 698 x 224, ...
    rng = np.random.default_rng(26)
    for _ in range(100):
        w, h, a, b = (int(v) for v in rng.integers(1, 2000, 4))
        cases.append((w, h, (max(a, 16), max(b, 16))))
    return cases


def test_the_graph_input_has_the_data_paths_size_and_scale_factor():
    """The export side resizes with the data transforms' own rule (``oilleak.data.rescale``, which imports no
    PyTorch): over BSData and fixture sizes, images already at the scale, 1-pixel sides, both scale orders,
    rounding ties and a random sweep, the graph's input has the test transform's size and scale factor."""
    assert postprocess.rescale_size is rescale_size  # one function, no copy
    for width, height, scale in _size_cases():
        image = np.zeros((height, width, 3), np.uint8)
        graph_input, scale_factor = postprocess.resize_for_graph(image, scale)
        _, meta = prepare_image(image, scale)
        assert graph_input.shape[:2] == meta.img_shape, (width, height, scale)
        assert scale_factor == meta.scale_factor, (width, height, scale)
    rng = np.random.default_rng(5)
    for width, height, scale in [(149, 298, (1333, 800)), (64, 48, SCALE), (333, 101, SCALE), (40, 41, SCALE)]:
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        graph_input, _ = postprocess.resize_for_graph(image, scale)
        tensor, _ = prepare_image(image, scale)
        torch.testing.assert_close(normalize(graph_input), tensor, rtol=0, atol=0)


def test_the_onnx_runtime_side_imports_no_pytorch():
    code = "import sys, oilleak.export.onnx_runtime; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_unsupported_opset_and_existing_file_are_clear_errors(tmp_path, sample_dir):
    detectors = random_checkpoint(tmp_path / "detectors.pth", sample_dir, calibrate=False)
    result = runner.invoke(app, ["export", str(detectors), str(tmp_path / "a.onnx"), "--opset", "17"])
    assert result.exit_code == 2 and "DeformConv" in result.output and "19" in result.output
    htc = random_checkpoint(tmp_path / "htc.pth", sample_dir, preset="htc_r50_tiny", calibrate=False)
    result = runner.invoke(app, ["export", str(htc), str(tmp_path / "b.onnx"), "--opset", "13"])
    assert result.exit_code == 2 and "RoiAlign" in result.output and "16" in result.output
    result = runner.invoke(app, ["export", str(htc), str(tmp_path / "c.onnx"), "--opset", "30"])
    assert result.exit_code == 2 and "opset" in result.output
    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"user data")
    result = runner.invoke(app, ["export", str(htc), str(taken)])
    assert result.exit_code == 2 and "exists" in result.output and taken.read_bytes() == b"user data"
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()
