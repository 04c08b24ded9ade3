"""The evaluation on a real dataset (the bundled BSData sample converted with `oilleak convert`): a stand-in
model that returns the ground truth must score 1.0 through the whole pipeline (dataset, transforms,
collate, inference loop, COCO evaluation); then `oilleak test` with the real tiny model and checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from oilleak.config import config_from_dict
from oilleak.data.dataset import build_dataset
from oilleak.data.labelme import convert_labelme
from oilleak.evaluate import run as evaluate_run
from oilleak.evaluate.coco_eval import evaluate_model
from oilleak.evaluate.run import run_test
from oilleak.errors import OilleakError
from oilleak.structures import Detections


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, sample_dir):
    root = tmp_path_factory.mktemp("bsdata") / "data"
    convert_labelme(sample_dir, root, classes=["Pitting"], val_fraction=0.3, seed=0)
    return root


def make_config(data_root, **model):
    return config_from_dict({
        "data": {"data_root": str(data_root), "classes": ["Pitting"], "scale": [640, 384], "workers": 0},
        "model": {"preset": "detectors_htc_r50_tiny", **model},
        "train": {"work_dir": str(data_root.parent / "work")},
    })


class GroundTruthModel(nn.Module):
    """Returns each image's ground truth (in original pixels) as its detections: the metrics must be 1.0."""

    def __init__(self, coco, cat_ids):
        super().__init__()
        self.coco, self.cat_ids = coco, list(cat_ids)
        self.calls = 0

    def forward(self, images, metas, targets=None):
        assert not self.training
        self.calls += 1
        out = []
        for meta in metas:
            anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[meta.image_id], catIds=self.cat_ids, iscrowd=False))
            h, w = meta.ori_shape
            masks = torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns]).astype(bool)) if anns else torch.zeros(0, h, w, dtype=torch.bool)
            boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]).reshape(-1, 4)
            scores = torch.linspace(0.9, 0.5, len(anns))
            labels = torch.tensor([self.cat_ids.index(a["category_id"]) for a in anns], dtype=torch.int64)
            out.append(Detections(boxes.float(), scores, labels, masks))
        return out


def test_evaluate_model_on_real_data_scores_one_for_ground_truth(data_root):
    config = make_config(data_root)
    dataset = build_dataset(config.data, "val", train=False)
    model = GroundTruthModel(dataset.coco, dataset.cat_ids)
    model.train()
    result = evaluate_model(model, dataset, device="cpu", batch_size=2, progress=False)
    assert model.training  # the training loop's mode is given back
    assert model.calls == (len(dataset) + 1) // 2
    assert result.class_names == ["Pitting"]
    assert result.metrics["segm_mAP"] == pytest.approx(1.0) and result.metrics["bbox_mAP"] == pytest.approx(1.0)
    assert result.per_class["segm"][0].num_gt == sum(1 for _ in dataset.coco.getAnnIds(imgIds=dataset.image_ids))


def test_run_test_writes_reports_pictures_and_detections(data_root, tmp_path, monkeypatch):
    config = make_config(data_root)
    stand_in = {}

    def fake_load(ckpt, cfg, overrides):
        ds = build_dataset(cfg.data, "val", train=False)
        stand_in["model"] = GroundTruthModel(ds.coco, ds.cat_ids)
        return stand_in["model"], "", cfg

    monkeypatch.setattr(evaluate_run, "load_model_for_test", fake_load)
    show, out = tmp_path / "show", tmp_path / "dets.pkl"
    outcome = run_test(config, tmp_path / "unused.pth", work_dir=tmp_path / "work", show_dir=show, out=out, progress=False)
    assert outcome.result.metrics["segm_mAP"] == pytest.approx(1.0)
    assert outcome.report_dir.parent == tmp_path / "work" and outcome.report_dir.name.startswith("test-")
    names = sorted(p.name for p in outcome.report_dir.iterdir())
    assert names == ["confusion_matrix.png", "metrics.json", "per_class.csv", "pr_curves_bbox.png", "pr_curves_segm.png", "report.md"]
    payload = json.loads((outcome.report_dir / "metrics.json").read_text())
    assert payload["mask_merge"] == config.model.mask_merge == "last"  # mmdetection 3.3's test-time masks by default
    cm = payload["confusion_matrix"]["rows_ground_truth_columns_predicted"]
    n_gt = payload["per_class"]["segm"][0]["num_gt"]
    assert cm == [[n_gt, 0], [0, 0]]  # ground truth as predictions: everything on the diagonal
    dataset = build_dataset(config.data, "val", train=False)
    pictures = sorted(show.rglob("*.jpg"))
    assert len(pictures) == len(dataset)
    with Image.open(pictures[0]) as im:
        record = next(r for r in dataset.records if r.file_name.endswith(pictures[0].name))
        assert im.width == 2 * record.width + 8 and im.height == record.height + 18  # two panels and titles
    assert out.is_file()

    # a second run never overwrites: --out and --show-dir are refused before the model runs
    stand_in.clear()
    with pytest.raises(OilleakError, match="already exists"):
        run_test(config, tmp_path / "unused.pth", work_dir=tmp_path / "work", out=out, progress=False)
    with pytest.raises(OilleakError, match="would overwrite"):
        run_test(config, tmp_path / "unused.pth", work_dir=tmp_path / "work", show_dir=show, progress=False)
    assert not stand_in


def test_run_test_never_writes_over_the_photos_or_the_annotations_overwrite_included(data_root, tmp_path, monkeypatch):
    config = make_config(data_root)
    photos = {p: p.read_bytes() for p in (data_root / "val").iterdir()}
    annotations = (data_root / "annotations" / "val.json").read_bytes()
    loaded = []
    monkeypatch.setattr(evaluate_run, "load_model_for_test", lambda *args: loaded.append(args))
    run = dict(work_dir=tmp_path / "work", overwrite=True, progress=False)
    with pytest.raises(OilleakError, match=f"would replace a file in the image folder {data_root / 'val'}.*--overwrite included"):
        run_test(config, tmp_path / "unused.pth", show_dir=data_root / "val", **run)
    with pytest.raises(OilleakError, match="is .*val.json, a file this test reads.*--overwrite included"):
        run_test(config, tmp_path / "unused.pth", out=data_root / "annotations" / "val.json", **run)
    assert not loaded and {p: p.read_bytes() for p in photos} == photos
    assert (data_root / "annotations" / "val.json").read_bytes() == annotations

    # the image folder holds links to the photos kept elsewhere: --show-dir there is refused too
    linked = tmp_path / "linked"
    shutil.copytree(data_root / "annotations", linked / "annotations")
    (linked / "val").mkdir()
    kept = tmp_path / "photos"
    shutil.copytree(data_root / "val", kept)
    for p in kept.iterdir():
        (linked / "val" / p.name).symlink_to(p)
    with pytest.raises(OilleakError, match="picture .* would replace a photo of the dataset"):
        run_test(make_config(linked), tmp_path / "unused.pth", show_dir=kept, **run)
    assert not loaded and {p.name: p.read_bytes() for p in kept.iterdir()} == {p.name: b for p, b in photos.items()}


# --- `oilleak test` with the real tiny model -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(data_root, tmp_path_factory):
    """A YAML config for the converted sample and an untrained tiny checkpoint trained on its classes."""
    from oilleak.config import save_config
    from tests.test_predict_model import SCALE, tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny")
    ckpt = tiny_checkpoint(folder / "tiny.pth", ["Pitting"], data_root)
    config = make_config(data_root)
    config.data.scale = SCALE
    save_config(config, folder / "config.yaml")
    return folder / "config.yaml", ckpt


def test_cli_test_with_oilleak_and_mmdetection_checkpoints(tiny, data_root, tmp_path):
    from typer.testing import CliRunner

    from oilleak.cli import app
    from oilleak.config import save_config

    config, ckpt = tiny
    runner = CliRunner()
    work, out = tmp_path / "work", tmp_path / "dets.json"
    result = runner.invoke(app, ["test", str(config), str(ckpt), "--work-dir", str(work), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "per class" in result.output and "Pitting" in result.output and "reports, plots:" in result.output
    (report_dir,) = work.iterdir()
    payload = json.loads((report_dir / "metrics.json").read_text())
    assert 0.0 <= payload["metrics"]["segm_mAP"] <= 1.0 and payload["checkpoint"] == str(ckpt)
    entries = json.loads(out.read_text())
    assert entries and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(entries[0])

    # the same weights as an mmdetection checkpoint: loaded with a report, same metrics
    raw = torch.load(ckpt, weights_only=False)
    mmdet = tmp_path / "epoch_12.pth"
    torch.save({"meta": {"dataset_meta": {"classes": ("Pitting",)}}, "state_dict": raw["state_dict"]}, mmdet)
    result = runner.invoke(app, ["test", str(config), str(mmdet), "--work-dir", str(tmp_path / "work2"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "tensors loaded" in result.output
    (report_dir2,) = (tmp_path / "work2").iterdir()
    assert json.loads((report_dir2 / "metrics.json").read_text())["metrics"] == payload["metrics"]

    # a config for the full model at another scale (configs/bsdata.yaml as it is): the checkpoint's model
    # and scale are used and said so, the config gives the data; the metrics are the same
    other = make_config(data_root, preset="detectors_htc_r50")
    other.data.scale = (1333, 800)
    save_config(other, tmp_path / "full.yaml")
    result = runner.invoke(app, ["test", str(tmp_path / "full.yaml"), str(ckpt), "--work-dir", str(tmp_path / "work3"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert ("from the checkpoint, as it was trained: model.preset detectors_htc_r50_tiny (the config says "
            "detectors_htc_r50); data.scale [512, 320] (the config says [1333, 800])") in " ".join(result.output.split())
    (report_dir3,) = (tmp_path / "work3").iterdir()
    assert json.loads((report_dir3 / "metrics.json").read_text())["metrics"] == payload["metrics"]

    # refused: --out exists; checkpoints of other classes (oilleak or mmdetection)
    result = runner.invoke(app, ["test", str(config), str(ckpt), "--out", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output
    torch.save({"meta": {"dataset_meta": {"classes": ("rust",)}}, "state_dict": raw["state_dict"]}, tmp_path / "other.pth")
    result = runner.invoke(app, ["test", str(config), str(tmp_path / "other.pth"), "--work-dir", str(work)])
    assert result.exit_code == 2 and "['rust']" in result.output
    raw["classes"] = ["rust"]
    torch.save(raw, tmp_path / "other_oilleak.pth")
    result = runner.invoke(app, ["test", str(config), str(tmp_path / "other_oilleak.pth"), "--work-dir", str(work)])
    assert result.exit_code == 2 and "trained on the classes ['rust']" in result.output
    assert "Traceback" not in result.output


def test_cli_test_names_the_config_file_in_data_errors(data_root, tmp_path):
    from typer.testing import CliRunner

    from oilleak.cli import app
    from oilleak.config import save_config

    config = make_config(data_root)
    config.data.classes = ["sly_dmyw"]  # not the data's class: refused before any checkpoint is read
    save_config(config, tmp_path / "mine.yaml")
    result = CliRunner().invoke(app, ["test", str(tmp_path / "mine.yaml"), str(tmp_path / "unused.pth")])
    assert result.exit_code == 2 and f"the class names in {tmp_path / 'mine.yaml'} do not match" in result.output


def test_set_values_win_over_the_checkpoints_model_and_scale(data_root):
    trained = make_config(data_root, mask_merge="last")
    trained.data.scale = (512, 320)
    mine = make_config(data_root, preset="detectors_htc_r50", mask_merge="mean")
    used, note = evaluate_run._from_checkpoint(mine, trained, ["data.scale=[256,160]", "train.lr=0.1"])
    assert (used.model.preset, used.model.mask_merge, used.data.scale) == ("detectors_htc_r50_tiny", "last", (256, 160))
    assert used.data.data_root == mine.data.data_root and used.train == mine.train  # the data and the rest: the config's
    assert "model.mask_merge last (the config says mean)" in note and "data.scale [256, 160]" in note


def test_torchrun_two_ranks_write_what_one_process_writes(tiny, tmp_path):
    """`oilleak test` under torchrun on 2 CPU processes (gloo): the images are split between the ranks and
    rank 0 writes the same metrics.json and detections as one process (one thread each: equal float sums)."""
    import os
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    from oilleak.config import load_config

    config, ckpt = tiny
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_test(load_config(config), ckpt, work_dir=tmp_path / "one", out=tmp_path / "one.pkl", progress=False)
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "oilleak",
           "test", str(config), str(ckpt), "--device", "cpu", "--work-dir", str(tmp_path / "two"), "--out",
           str(tmp_path / "two.pkl")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reports, plots:") == 1  # printed by rank 0 only
    (report_dir,) = (tmp_path / "two").iterdir()
    metrics = json.loads((one.report_dir / "metrics.json").read_text())
    assert metrics["images"] == 3  # an odd count: rank 0 predicts two images, rank 1 one
    assert json.loads((report_dir / "metrics.json").read_text()) == metrics
    detections = [pickle.loads((tmp_path / f"{n}.pkl").read_bytes()) for n in ("one", "two")]
    assert [d["img_id"] for d in detections[1]] == [d["img_id"] for d in detections[0]]  # each once, in order
    for mine, theirs in zip(*detections):  # mmdetection's result pickle: see tests/test_mmdet_results.py
        mine, theirs = mine["pred_instances"], theirs["pred_instances"]
        assert mine["masks"] == theirs["masks"]
        for key in ("bboxes", "scores", "labels"):
            assert torch.equal(mine[key], theirs[key])
