"""An mmdetection 3.x project as it is: the oil-leak project's own config file (../shared/mmdet_project), read
with mmengine over mmdetection 3.3.0's own ``_base_`` tree (extracted from the peer's wheel in ../shared),
trained and tested by oilleak with only its data paths changed, as mmdetection users do (``--cfg-options``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from oilleak.cli import spread_cfg_options
from oilleak.mmdet_project import MMDetConfigError, read_mmdet_project
from tests.conftest import REPO, SHARED, _require

WHEEL = SHARED / "peers" / "mmdet" / "wheels-py312" / "mmdet-3.3.0-py3-none-any.whl"
USER_CONFIG = SHARED / "mmdet_project" / "configs" / "detectors" / "oilleak.py"
CLASSES = ("sly_bjbmyw", "sly_bjbmyw_dry", "sly_bjbmyw_susp", "sly_dmyw", "sly_dmyw_dry", "sly_dmyw_susp")
# A config of "ours" in the same tree: DetectoRS' own file as base, a smaller scale, one image per batch, other
# folders. mmengine merges dicts, so data_prefix keeps the base's seg='stuffthingmaps/train2017/'.
DERIVED = """_base_ = './detectors_htc-r50_1x_coco.py'
classes = {classes!r}
data_root = '{root}/'
scale = (512, 320)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True, with_seg=True),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(batch_size=1, num_workers=0, dataset=dict(
    data_root=data_root, ann_file='annotations/train.json', data_prefix=dict(img='train/'),
    metainfo=dict(classes=classes), pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(
    data_root=data_root, ann_file='annotations/val.json', data_prefix=dict(img='val/'),
    metainfo=dict(classes=classes), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json')
test_evaluator = val_evaluator
"""


@pytest.fixture(scope="module")
def config_tree(tmp_path_factory) -> Path:
    """mmdetection 3.3.0's configs/ from the wheel, with the user's file at configs/detectors/oilleak.py."""
    root = tmp_path_factory.mktemp("mmdet_configs")
    with zipfile.ZipFile(_require(WHEEL)) as wheel:
        for name in wheel.namelist():
            if name.startswith("mmdet/.mim/configs/") and ("/_base_/" in name or "/htc/" in name or "/detectors/" in name):
                wheel.extract(name, root)
    configs = root / "mmdet" / ".mim" / "configs"
    shutil.copy(_require(USER_CONFIG), configs / "detectors" / "oilleak.py")
    return configs


@pytest.fixture(scope="module")
def oil_data(tmp_path_factory, bsdata_dir) -> Path:
    """Five BSData photos, their stains labelled with the oil classes in turn, converted to mmdetection's layout."""
    from oilleak.data.labelme import convert_labelme

    labelme = tmp_path_factory.mktemp("labelme")
    k = 0
    for ann in sorted(bsdata_dir.glob("*.json"))[:5]:
        doc = json.loads(ann.read_text())
        for shape in doc["shapes"]:
            shape["label"], k = CLASSES[k % len(CLASSES)], k + 1
        (labelme / ann.name).write_text(json.dumps(doc))
        shutil.copy(ann.with_suffix(".jpg"), labelme / ann.with_suffix(".jpg").name)
    out = tmp_path_factory.mktemp("oil") / "data"
    convert_labelme(labelme, out, list(CLASSES), val_fraction=0.4, seed=0)
    return out


def data_options(root: Path) -> list[str]:
    """What a user changes to point the file at their data (mmdetection's own --cfg-options keys)."""
    return [f"{loader}.dataset.data_root={root}/" for loader in ("train_dataloader", "val_dataloader", "test_dataloader")] + [
        f"{evaluator}.ann_file={root}/annotations/val.json" for evaluator in ("val_evaluator", "test_evaluator")
    ]


def oilleak(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"}  # wide enough that no table cell folds
    return subprocess.run([sys.executable, "-m", "oilleak", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)


def test_the_users_file_maps_onto_oilleaks_config(config_tree, oil_data):
    project = read_mmdet_project(config_tree / "detectors" / "oilleak.py", data_options(oil_data))
    cfg = project.config
    assert tuple(cfg.data.classes) == CLASSES
    assert Path(cfg.data.data_root) == oil_data and cfg.data.train.ann_file == "annotations/train.json"
    assert (cfg.data.train.img_dir, cfg.data.train.sem_dir) == ("train", "train_mask")
    assert cfg.data.test is not None and cfg.data.test.ann_file == "annotations/val.json"
    assert cfg.data.scale == (1333, 800) and cfg.data.multi_scale == [] and cfg.data.flip_prob == 0.5
    assert (cfg.data.batch_size, cfg.data.keep_negatives) == (2, False)  # filter_empty_gt=True in the base
    assert cfg.model.preset == "detectors_htc_r50" and cfg.model.norm == "batch"
    assert (cfg.train.lr, cfg.train.momentum, cfg.train.weight_decay) == (0.02, 0.9, 0.0001)
    assert (cfg.train.warmup_iters, cfg.train.warmup_ratio, cfg.train.milestones, cfg.train.gamma) == (500, 0.001, [8, 11], 0.1)
    assert (cfg.train.epochs, cfg.train.lr_schedule, cfg.train.base_batch_size) == (12, "step", 16)
    assert cfg.train.load_from == "/data/zengzw/models/mmdetection/detectors_cascade_rcnn_r50_1x_coco-32a10ba0.pth"
    assert cfg.train.work_dir == "work_dirs/oilleak"  # mmdetection's default: work_dirs/<config name>
    ignored = dict(project.report.ignored)
    assert "7 outputs" in ignored["model.roi_head.semantic_head.num_classes"]
    assert "derives the maps" in ignored["train semantic maps"]


def test_convert_config_writes_the_equivalent_yaml_and_never_overwrites(config_tree, oil_data, tmp_path):
    out = tmp_path / "oilleak.yaml"
    args = ["convert-config", str(config_tree / "detectors" / "oilleak.py"), str(out), "--cfg-options", *data_options(oil_data)]
    done = oilleak(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    from oilleak.config import load_config

    written = load_config(out)
    assert written == read_mmdet_project(config_tree / "detectors" / "oilleak.py", data_options(oil_data)).config
    again = oilleak(*args, cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_refusals_name_the_key_and_the_fix(config_tree, oil_data):
    user = config_tree / "detectors" / "oilleak.py"
    with pytest.raises(MMDetConfigError, match=r"val_evaluator\.ann_file.*--cfg-options val_evaluator\.ann_file="):
        read_mmdet_project(user, data_options(oil_data)[:3])  # data moved, evaluator not
    with pytest.raises(MMDetConfigError, match=r"train_dataloader\.dataset\.pipeline\.2\.keep_ratio.*keep_ratio=True"):
        read_mmdet_project(user, [*data_options(oil_data), "train_dataloader.dataset.pipeline.2.keep_ratio=False"])
    with pytest.raises(MMDetConfigError, match=r"optim_wrapper\.optimizer\.type.*SGD"):
        read_mmdet_project(user, [*data_options(oil_data), "optim_wrapper.optimizer.type=AdamW"])
    with pytest.raises(MMDetConfigError, match=r"rfp_inplanes = 256 must be 128"):
        read_mmdet_project(user, [*data_options(oil_data), "model.neck.out_channels=128"])
    with pytest.raises(MMDetConfigError, match=r"neither .*differences: rpn\.scales \(4\.0,\) \(preset: \(8\.0,\)\)"):
        read_mmdet_project(user, [*data_options(oil_data), "model.rpn_head.anchor_generator.scales=[4.0]"])


def test_without_mmengine_the_message_says_what_to_install(config_tree, monkeypatch):
    monkeypatch.setitem(sys.modules, "mmengine", None)  # import mmengine now raises ImportError
    monkeypatch.setitem(sys.modules, "mmengine.config", None)
    with pytest.raises(MMDetConfigError, match=r"pip install 'oilleak\[mmdet\]'"):
        read_mmdet_project(config_tree / "detectors" / "oilleak.py")


def test_cfg_options_take_mmdetections_spelling():
    argv = ["train", "c.py", "--cfg-options", "a.b=1", "c=[1,2]", "--max-iters", "1", "--cfg-options", "d=x"]
    assert spread_cfg_options(argv) == ["train", "c.py", "--cfg-options", "a.b=1", "--cfg-options", "c=[1,2]",
                                        "--max-iters", "1", "--cfg-options", "d=x"]


def test_cfg_options_on_a_yaml_config_point_to_set(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"data_root": str(tmp_path), "classes": ["a"]}}))
    done = oilleak("check", str(config), "--cfg-options", "a=1", cwd=tmp_path)
    assert done.returncode == 2 and "--set KEY=VALUE" in done.stderr


@pytest.mark.slow
def test_the_users_file_trains_and_tests_unchanged(config_tree, oil_data, tmp_path):
    """The README's two mmdetection commands, as oilleak's: the full DetectoRS-HTC-R50 at (1333, 800), one
    iteration on the CPU from random weights (the file's load_from is the users' machine's), then test."""
    options = ["--cfg-options", *data_options(oil_data), "load_from=None"]
    work = tmp_path / "work"
    trained = oilleak("train", "configs/detectors/oilleak.py", "--work-dir", str(work), "--max-iters", "1", "--device", "cpu",
                      *options, cwd=config_tree.parent)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "detectors_htc_r50" in trained.stdout and (work / "latest.pth").is_file()
    tested = oilleak("test", "configs/detectors/oilleak.py", str(work / "latest.pth"), "--work-dir", str(tmp_path / "test"),
                     "--out", str(tmp_path / "test.pkl"), "--device", "cpu", *options, cwd=config_tree.parent)
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    import pickle

    with (tmp_path / "test.pkl").open("rb") as f:
        results = pickle.load(f)
    assert len(results) == len(json.loads((oil_data / "annotations" / "val.json").read_text())["images"])
    assert {"img_id", "img_path", "pred_instances"} <= set(results[0])


@pytest.mark.slow
def test_a_config_inheriting_detectors_trains_with_derived_semantic_maps(config_tree, oil_data, tmp_path):
    ours = config_tree / "detectors" / "oilleak_small.py"
    ours.write_text(DERIVED.format(classes=CLASSES, root=oil_data))
    project = read_mmdet_project(ours)
    assert project.config.data.scale == (512, 320) and project.config.data.batch_size == 1
    assert project.config.data.train.sem_dir == "stuffthingmaps/train2017"  # kept from the base by the dict merge
    work = tmp_path / "work"
    trained = oilleak("train", str(ours), "--work-dir", str(work), "--max-iters", "1", "--device", "cpu", cwd=tmp_path)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "stuffthingmaps/train2017 does not exist: oilleak derives the maps from the instance masks" in trained.stdout
    assert (work / "latest.pth").is_file()
