"""``oilleak train`` through the real command: SIGTERM saves a resumable checkpoint, a dataset that fails
its check stops with exit 2 and no traceback, and a smoke run on BSData converted by ``oilleak convert``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from oilleak.cli import app, parse_duration
from oilleak.config import config_from_dict, save_config
from test_train_loop import make_shapes, shapes_config

REPO = Path(__file__).resolve().parents[1]


def _oilleak(*args: str) -> list[str]:
    return [sys.executable, "-m", "oilleak", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _train_lines(work_dir: Path) -> list[dict]:
    path = work_dir / "log.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["type"] == "train"]


def _iteration(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True)["train_state"]["iteration"]


def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
    data = make_shapes(tmp_path / "shapes", images=2, size=96)
    work = tmp_path / "work"
    config = tmp_path / "shapes.yaml"
    save_config(shapes_config(data, work, train={"epochs": 50, "milestones": [40]}), config)
    proc = subprocess.Popen(_oilleak("train", str(config), "--device", "cpu"), env=_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not _train_lines(work) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _train_lines(work), "training logged no iteration"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in out and "--resume" in out
    stopped_at = _iteration(work / "latest.pth")
    assert stopped_at == len(_train_lines(work)) >= 1  # every step done is in the checkpoint, none lost

    resumed = subprocess.run(
        _oilleak("train", str(config), "--device", "cpu", "--resume", "--max-iters", str(stopped_at + 1)),
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"iteration {stopped_at}" in resumed.stdout  # "resuming from ...: ..., iteration N"
    assert _iteration(work / "latest.pth") == stopped_at + 1
    assert [r["iter"] for r in _train_lines(work)] == list(range(1, stopped_at + 2))


def test_dataset_check_failure_exits_2_without_traceback(tmp_path):
    data = make_shapes(tmp_path / "shapes", images=1, size=96)
    config = tmp_path / "wrong_classes.yaml"
    cfg = shapes_config(data, tmp_path / "work").to_dict()
    cfg["data"]["classes"] = ["sly_bjbmyw", "sly_dmyw"]  # the user's mmdetection classes; the json has box / disc
    save_config(config_from_dict(cfg), config)
    result = CliRunner().invoke(app, ["train", str(config), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "sly_bjbmyw" in result.output
    assert not (tmp_path / "work" / "latest.pth").exists()


def test_bsdata_smoke_convert_train_resume(bsdata_dir, tmp_path):
    labelme = tmp_path / "labelme"
    labelme.mkdir()
    for json_file in sorted(bsdata_dir.glob("*.json"))[:3]:
        shutil.copy(json_file, labelme)
        shutil.copy(json_file.with_suffix(".jpg"), labelme)
    runner = CliRunner()
    converted = runner.invoke(app, ["convert", str(labelme), str(tmp_path / "data"), "--classes", "Pitting",
                                    "--val-fraction", "0.34"])
    assert converted.exit_code == 0, converted.output
    work = tmp_path / "work"
    args = ["train", str(REPO / "configs" / "bsdata.yaml"), "--device", "cpu", "--work-dir", str(work),
            "--set", f"data.data_root={tmp_path / 'data'}", "--set", "data.scale=[256,128]",
            "--set", "data.batch_size=1", "--set", "data.workers=0", "--set", "model.preset=detectors_htc_r50_tiny",
            "--set", "train.log_interval=1", "--set", "train.warmup_iters=2", "--set", "train.lr=0.002",
            "--set", "train.grad_clip=10"]  # unclipped, a random start can blow up by step 3 (the stop evaluation meets NaN)
    first = runner.invoke(app, [*args, "--max-iters", "1", "--amp"])
    assert first.exit_code == 0, first.output
    assert "--amp / train.amp is ignored on CPU" in first.output
    assert "lr 0.002 for a total batch of 1" in first.output and "--auto-scale-lr" in first.output
    assert "training from random weights" in first.output
    assert _iteration(work / "latest.pth") == 1 and (work / "config.yaml").is_file()
    second = runner.invoke(app, [*args, "--resume", "--max-iters", "3"])  # crosses the end of epoch 1
    assert second.exit_code == 0, second.output
    assert "resuming from" in second.output and "segm_mAP" in (work / "log.jsonl").read_text()
    assert _iteration(work / "latest.pth") == 3 and (work / "epoch_1.pth").is_file()


def test_time_option_reads_durations():
    assert [parse_duration(t) for t in ("900", "900s", "15m", "1.5h", " 2M ")] == [900, 900, 900, 5400, 120]
    for bad in ("", "m", "fast", "-5m", "0", "inf"):
        with pytest.raises(typer.BadParameter, match="is not a duration"):
            parse_duration(bad)
