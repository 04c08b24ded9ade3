"""Typed config: YAML loading, --set overrides, and errors that name the key and the fix."""

from __future__ import annotations

import pytest
import yaml

from oilleak.config import ConfigError, config_from_dict, load_config, save_config
from oilleak.train.schedule import from_random_weights
from tests.conftest import REPO

MINIMAL = {"data": {"data_root": "data/x", "classes": ["a", "b"]}}


def test_bundled_configs_load_with_the_user_setup():
    cfg = load_config(REPO / "configs" / "oilleak.yaml")
    assert cfg.data.classes == [
        "sly_bjbmyw", "sly_bjbmyw_dry", "sly_bjbmyw_susp", "sly_dmyw", "sly_dmyw_dry", "sly_dmyw_susp",
    ]
    assert cfg.data.train.ann_file == "annotations/train.json" and cfg.data.val.img_dir == "val"
    assert cfg.data.train.sem_dir == "train_mask" and cfg.data.val.sem_dir == "val_mask"
    assert cfg.model.preset == "detectors_htc_r50"
    # mmdetection's 1x schedule
    t = cfg.train
    assert (t.epochs, t.lr, t.base_batch_size, t.momentum, t.weight_decay) == (12, 0.02, 16, 0.9, 1e-4)
    assert (t.warmup_iters, t.warmup_ratio, t.milestones, t.gamma) == (500, 0.001, [8, 11], 0.1)
    assert load_config(REPO / "configs" / "bsdata.yaml").data.classes == ["Pitting"]
    # the CPU config keeps the measured recipe (BENCHMARKS.md: the curve it was written from)
    cpu = load_config(REPO / "configs" / "bsdata_cpu.yaml")
    assert cpu.model.preset == "detectors_htc_r50_tiny" and cpu.data.scale == (512, 320)
    assert (cpu.train.lr, cpu.train.base_batch_size, cpu.train.warmup_iters, cpu.train.grad_clip) == (0.01, 2, 50, 10.0)
    assert (cpu.train.lr_schedule, cpu.train.time_budget_s, cpu.train.min_lr_ratio) == ("cosine", 900, 0.01)
    # GroupNorm, as the curves measured, through model.norm's default from random weights
    assert cpu.model.norm == "auto" and cpu.model.resolved_norm(from_random_weights(cpu.train)) == "group"


def test_overrides_are_typed_and_nested():
    cfg = config_from_dict(MINIMAL, overrides=["train.lr=0.005", "data.scale=[640, 384]", "data.train.sem_dir=null"])
    assert cfg.train.lr == 0.005
    assert cfg.data.scale == (640, 384)
    assert cfg.data.train.sem_dir is None


@pytest.mark.parametrize(
    ("override", "expected"),
    [("train.lrr=0.1", "did you mean 'train.lr'"), ("data.clases=[a]", "did you mean 'data.classes'"),
     ("modle.preset=htc_r50", "did you mean 'model.preset'")],
)
def test_misspelt_override_names_the_closest_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        config_from_dict(MINIMAL, overrides=[override])


def test_misspelt_key_in_file_names_file_key_and_suggestion(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "train": {"epoch": 3}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "train.epoch" in message and "train.epochs" in message


def test_bad_values_are_reported_with_the_key():
    with pytest.raises(ConfigError, match=r"'train.lr'.*greater than 0"):
        config_from_dict(MINIMAL, overrides=["train.lr=-1"])
    with pytest.raises(ConfigError, match="model.preset"):
        config_from_dict(MINIMAL, overrides=["model.preset=yolo"])
    with pytest.raises(ConfigError, match="unique"):
        config_from_dict({"data": {"data_root": "x", "classes": ["a", "a"]}})
    with pytest.raises(ConfigError, match="milestones"):
        config_from_dict(MINIMAL, overrides=["train.epochs=6"])  # milestones 8, 11 lie past the end


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML.*line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        config_from_dict(MINIMAL, overrides=["train.lr"])


def test_save_and_reload_round_trip(tmp_path):
    cfg = config_from_dict(MINIMAL, overrides=["train.epochs=3", "train.milestones=[2]"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_every_preset_is_documented_in_train_help_and_readme():
    from pathlib import Path

    from typer.testing import CliRunner

    from oilleak.cli import app
    from oilleak.config import PRESETS

    help_text = " ".join(CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output.split())
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in PRESETS:
        assert f"`{name}`" in readme
        assert name in help_text or (name.endswith("_tiny") and "their _tiny versions" in help_text), name
