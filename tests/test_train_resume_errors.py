"""A checkpoint that does not fit what the command asks for stops with a message naming the checkpoint,
what differs and the fix, never a traceback: ``--set model.preset=`` of another width (train --resume and
predict), and ``--resume`` after a change of what trains (``train.backbone_norm``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from oilleak.cli import app
from oilleak.config import Config, config_from_dict, save_config
from oilleak.errors import OilleakError
from oilleak.train.loop import TrainOptions, run_training
from test_train_loop import make_shapes, quiet, shapes_config


def _config(data: Path, work: Path, **train) -> Config:
    # htc_r50_tiny: its full-width twin htc_r50 builds in seconds (DetectoRS' takes far longer on 2 cores);
    # model.norm batch with mmdetection's frozen stem and stage 1 (train.backbone_norm: frozen)
    base = shapes_config(data, work, train={"epochs": 1, "milestones": [1], **train}).to_dict()
    return config_from_dict({**base, "model": {"preset": "htc_r50_tiny", "norm": "batch"}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """The data and the work dir of a one-step training (latest.pth at iteration 1)."""
    root = tmp_path_factory.mktemp("resume_errors")
    data = make_shapes(root / "shapes", images=2, size=96)
    work = root / "work"
    result = run_training(_config(data, work), TrainOptions(max_iters=1, device="cpu"), quiet())
    assert result.iterations == 1
    return data, work


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_with_a_preset_of_another_width_names_the_keys_and_the_trained_preset(trained):
    data, work = trained
    before = _digest(work / "latest.pth")
    config = config_from_dict({**_config(data, work).to_dict(), "model": {"preset": "htc_r50", "norm": "batch"}})
    with pytest.raises(OilleakError) as err:
        run_training(config, TrainOptions(resume=True, max_iters=2, device="cpu"), quiet())
    message = str(err.value)
    assert f"checkpoint {work / 'latest.pth'} does not fit the model.preset htc_r50 model" in message
    # the first mismatching tensor with both shapes: the tiny stem has 16 channels, ResNet-50's 64
    assert "backbone.conv1.weight: [16, 3, 7, 7] in the checkpoint, [64, 3, 7, 7] in the model" in message
    assert "It was trained with model.preset=htc_r50_tiny" in message and "--set model.preset=htc_r50_tiny" in message
    assert _digest(work / "latest.pth") == before


def test_predict_with_a_preset_of_another_width_exits_2_without_traceback(trained, tmp_path):
    _, work = trained
    Image.new("RGB", (96, 96), (90, 90, 90)).save(tmp_path / "photo.png")
    result = CliRunner().invoke(app, ["predict", str(work / "latest.pth"), str(tmp_path / "photo.png"),
                                      "--out-dir", str(tmp_path / "out"), "--device", "cpu",
                                      "--set", "model.preset=htc_r50"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "RuntimeError" not in result.output
    assert "backbone.conv1.weight: [16, 3, 7, 7] in the checkpoint" in result.output
    assert "--set model.preset=htc_r50_tiny" in result.output


def test_resume_after_changing_what_trains_names_the_change_and_the_fix(trained, tmp_path):
    data, work = trained
    before = _digest(work / "latest.pth")
    config = tmp_path / "shapes.yaml"
    save_config(_config(data, work), config)
    # unfreezing the stem and stage 1 adds trained tensors the checkpoint's optimiser has no state for
    result = CliRunner().invoke(app, ["train", str(config), "--resume", "--device", "cpu", "--max-iters", "2",
                                      "--set", "train.backbone_norm=batch"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "ValueError" not in result.output
    message = " ".join(result.output.split())
    assert f"--resume from {work / 'latest.pth'}" in message
    assert "train.backbone_norm: frozen in the checkpoint, batch now" in message
    assert "--load-from" in message and "--work-dir" in message
    assert _digest(work / "latest.pth") == before
