"""The training loop on the real tiny DetectoRS preset and the real dataset pipeline, on synthetic shapes:
resume equals an uninterrupted run, NaN stops with the term named, the dataset check stops bad data,
work dirs are never overwritten."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from rich.console import Console

from oilleak.config import config_from_dict
from oilleak.train.loop import TrainingDiverged, TrainOptions, run_training
from oilleak.errors import OilleakError
from oilleak.models.checkpoint import save_checkpoint

CLASSES = ["box", "disc"]
COLORS = {"box": (220, 60, 40), "disc": (40, 90, 230)}


def _shape_polygon(kind: str, cx: float, cy: float, rx: float, ry: float) -> list[tuple[float, float]]:
    if kind == "box":
        return [(cx - rx, cy - ry), (cx + rx, cy - ry), (cx + rx, cy + ry), (cx - rx, cy + ry)]
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]


def make_shapes(root: Path, *, images: int, size: int, seed: int = 0) -> Path:
    """``images`` noisy ``size`` x ``size`` pictures with 1-3 filled boxes / discs each, in the COCO layout
    (annotations/train.json and val.json list the same images: training data evaluated on itself)."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]}
    for image_id in range(1, images + 1):
        pixels = np.clip(rng.normal(128, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        picture = Image.fromarray(pixels)
        draw = ImageDraw.Draw(picture)
        placed: list[tuple[float, float, float, float]] = []
        for _ in range(int(rng.integers(1, 4))):
            for _attempt in range(20):
                rx, ry = rng.uniform(size * 0.08, size * 0.2, 2)
                cx, cy = rng.uniform(rx + 2, size - rx - 2), rng.uniform(ry + 2, size - ry - 2)
                box = (cx - rx, cy - ry, cx + rx, cy + ry)
                if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in placed):
                    break
            else:
                continue
            placed.append(box)
            kind = CLASSES[int(rng.integers(len(CLASSES)))]
            polygon = _shape_polygon(kind, cx, cy, rx, ry)
            draw.polygon(polygon, fill=COLORS[kind])
            xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": CLASSES.index(kind) + 1,
                "segmentation": [[round(v, 2) for p in polygon for v in p]],
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                "area": (max(xs) - min(xs)) * (max(ys) - min(ys)), "iscrowd": 0,
            })
        name = f"shapes_{image_id:03d}.png"
        picture.save(root / "train" / name)
        coco["images"].append({"id": image_id, "file_name": name, "width": size, "height": size})
    for split in ("train", "val"):
        (root / "annotations" / f"{split}.json").write_text(json.dumps(coco))
    return root


def shapes_config(root: Path, work_dir: Path, *, size: int = 96, train: dict | None = None, data: dict | None = None):
    split = {"ann_file": "annotations/train.json", "img_dir": "train", "sem_dir": None}
    return config_from_dict({
        "data": {"data_root": str(root), "classes": CLASSES, "train": split,
                 "val": {**split, "ann_file": "annotations/val.json"}, "scale": [size, size],
                 "batch_size": 1, "workers": 0, **(data or {})},
        "model": {"preset": "detectors_htc_r50_tiny"},
        "train": {"work_dir": str(work_dir), "epochs": 3, "milestones": [2], "lr": 0.004, "warmup_iters": 2,
                  "grad_clip": 10.0, "log_interval": 1, **(train or {})},
    })


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), images=2, size=96)  # 96: DetectoRS' smallest input


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"), width=120)  # noqa: SIM115


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def train_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["train_state"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((x.double() - y.double()).abs().max().item() for x, y in zip(a.values(), b.values()) if x.numel())
    assert worst <= 1e-7, f"weights differ by up to {worst}"


def test_resume_mid_epoch_equals_one_run(shapes, tmp_path):
    # 2 images, batch 1: 2 steps per epoch. One run of 3 steps (epoch 1, its evaluation and checkpoint, one
    # step of epoch 2) against 1 step, stop, resume for 2 more; the resumed run loads with 2 workers, so
    # this also shows the batches do not depend on the worker count.
    one = run_training(shapes_config(shapes, tmp_path / "one"), TrainOptions(max_iters=3, device="cpu"), quiet())
    assert (one.iterations, one.epochs_done, one.stopped_by) == (3, 1, "max-iters")

    two_cfg = shapes_config(shapes, tmp_path / "two")
    first = run_training(two_cfg, TrainOptions(max_iters=1, device="cpu"), quiet())
    assert first.stopped_by == "max-iters" and first.iterations == 1
    state = train_state(tmp_path / "two" / "latest.pth")
    assert (state["epoch"], state["step_in_epoch"], state["iteration"]) == (0, 1, 1)
    with_workers = shapes_config(shapes, tmp_path / "two", data={"workers": 2})
    second = run_training(with_workers, TrainOptions(max_iters=3, resume=True, device="cpu"), quiet())
    assert second.iterations == 3

    latest_one, latest_two = tmp_path / "one" / "latest.pth", tmp_path / "two" / "latest.pth"
    assert_same_weights(weights(latest_one), weights(latest_two))
    assert_same_weights(one.model.state_dict(), weights(latest_one))
    s1, s2 = train_state(latest_one), train_state(latest_two)
    # the best metric came through the resume; the runs stopped by --max-iters were evaluated where they stopped
    for state, work in ((s1, tmp_path / "one"), (s2, tmp_path / "two")):
        scores = [json.loads(line).get("segm_mAP") for line in (work / "log.jsonl").read_text().splitlines()]
        assert state["best"] is not None and state["best"] == max(s for s in scores if s is not None)
    assert torch.equal(s1["rng"][0]["torch"], s2["rng"][0]["torch"])
    for a, b in zip(s1["optimizer"]["state"].values(), s2["optimizer"]["state"].values()):
        assert torch.allclose(a["momentum_buffer"], b["momentum_buffer"], atol=1e-7, rtol=0)
    # the work dir of a resumed run: the first config kept, the log appended, one epoch checkpoint, best
    names = {p.name for p in (tmp_path / "two").iterdir()}
    assert {"config.yaml", "log.jsonl", "latest.pth", "best.pth", "epoch_1.pth", "loss_curve.png", "tb"} <= names
    records = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 2, 3]
    # evaluated at the --max-iters 1 stop, after epoch 1, and at the --max-iters 3 stop in epoch 2
    assert [(r["epoch"], r["iter"]) for r in records if r["type"] == "val"] == [(1, 1), (1, 2), (2, 3)]


def test_a_run_shorter_than_the_log_interval_logs_its_first_and_last_step(shapes, tmp_path):
    # 2 steps per epoch x 3 epochs = 6 steps; --max-iters 3 makes 3 the total the progress counts to
    out = io.StringIO()
    cfg = shapes_config(shapes, tmp_path, train={"log_interval": 50})
    run_training(cfg, TrainOptions(max_iters=3, device="cpu"), Console(file=out, width=200))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["type"] == "train"] == [1, 3]
    printed = out.getvalue()
    assert "epoch 1 iter 1/3 " in printed and "epoch 2 iter 3/3 " in printed and "/6" not in printed


def test_a_run_shorter_than_an_epoch_is_evaluated_and_leaves_best_pth(shapes, tmp_path):
    out = io.StringIO()
    result = run_training(shapes_config(shapes, tmp_path), TrainOptions(max_iters=1, device="cpu"),
                          Console(file=out, width=400))
    assert (result.iterations, result.epochs_done, result.stopped_by) == (1, 0, "max-iters")
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["iter"]) for r in records if r["type"] == "val"] == [(1, 1)]
    assert train_state(tmp_path / "best.pth")["best"] == records[-1]["segm_mAP"] == result.best
    assert_same_weights(weights(tmp_path / "best.pth"), weights(tmp_path / "latest.pth"))
    assert f"checkpoint to test and predict with: {tmp_path / 'best.pth'}" in out.getvalue()


def test_time_budget_stops_evaluated_and_resumable(shapes, tmp_path):
    # a budget shorter than any step: the first step runs (0 s trained before it), the second sees the budget
    # spent and does not run; the stop is evaluated, leaves best.pth and latest.pth with the seconds trained
    out = io.StringIO()
    result = run_training(shapes_config(shapes, tmp_path), TrainOptions(time_budget_s=1e-6, device="cpu"),
                          Console(file=out, width=400))
    assert (result.iterations, result.epochs_done, result.stopped_by) == (1, 0, "time")
    state = train_state(tmp_path / "latest.pth")
    assert (state["iteration"], state["step_in_epoch"]) == (1, 1) and state["trained_s"] > 0
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["iter"]) for r in records if r["type"] == "val"] == [(1, 1)]
    assert (tmp_path / "best.pth").is_file()
    assert "s of training (time budget 1e-06 s), 1 iterations" in out.getvalue()
    # resumed with the same budget there is nothing left to train; with a larger one it goes on to the end
    again = run_training(shapes_config(shapes, tmp_path), TrainOptions(time_budget_s=1e-6, resume=True, device="cpu"), quiet())
    assert (again.iterations, again.stopped_by) == (1, "time")
    rest = run_training(shapes_config(shapes, tmp_path), TrainOptions(time_budget_s=1e6, resume=True, device="cpu"), quiet())
    assert (rest.iterations, rest.epochs_done, rest.stopped_by) == (6, 3, None)
    assert train_state(tmp_path / "latest.pth")["trained_s"] > state["trained_s"]


def test_cosine_schedule_by_iterations(shapes, tmp_path):
    # 2 steps per epoch x 3 epochs; warm-up 2 iterations from 0.5 x lr; cosine to 0.1 x lr over 6 iterations
    cfg = shapes_config(shapes, tmp_path, train={"lr_schedule": "cosine", "min_lr_ratio": 0.1, "warmup_iters": 2,
                                                  "warmup_ratio": 0.5, "eval_interval": 3})
    run_training(cfg, TrainOptions(device="cpu"), quiet())
    logged = [json.loads(line)["lr"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    cosine = [0.1 + 0.9 * (1 + math.cos(math.pi * i / 6)) / 2 for i in range(6)]
    expected = [0.004 * w * c for w, c in zip([0.5, 1, 1, 1, 1, 1], cosine)]
    assert logged == pytest.approx(expected, rel=1e-9)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(shapes, tmp_path):
    # one step per epoch; warmup from lr 1e-6 to 1e6: the first step (epoch 1, checkpointed) is sane,
    # the second blows the weights up, the third meets NaN. No evaluation before the end.
    cfg = shapes_config(shapes, tmp_path, data={"batch_size": 2}, train={
        "lr": 1e6, "warmup_ratio": 1e-12, "warmup_iters": 3, "grad_clip": None, "epochs": 6, "milestones": [5],
        "eval_interval": 6})
    with pytest.raises(TrainingDiverged) as err:
        run_training(cfg, TrainOptions(device="cpu"), quiet())
    message = str(err.value)
    assert message.startswith("training stopped at iteration ")
    assert "loss term '" in message or "NaN" in message
    assert "train.lr" in message and "grad_clip" in message and "--resume" in message
    stopped_at = int(message.split("iteration ")[1].split()[0])
    assert stopped_at >= 3, message
    latest = tmp_path / "latest.pth"
    assert str(latest) in message
    state = train_state(latest)
    assert 1 <= state["iteration"] < stopped_at
    assert all(torch.isfinite(t).all() for t in weights(latest).values() if t.is_floating_point())


def test_fresh_training_refuses_a_used_work_dir(shapes, tmp_path):
    (tmp_path / "config.yaml").write_text("mine: true\n")
    with pytest.raises(OilleakError, match="already holds a training"):
        run_training(shapes_config(shapes, tmp_path), TrainOptions(device="cpu"), quiet())
    assert (tmp_path / "config.yaml").read_text() == "mine: true\n"
    with pytest.raises(OilleakError, match="nothing to resume"):
        run_training(shapes_config(shapes, tmp_path / "empty"), TrainOptions(resume=True, device="cpu"), quiet())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "latest.pth").write_bytes(b"")
    with pytest.raises(OilleakError, match="holds another training"):
        run_training(shapes_config(shapes, tmp_path),
                     TrainOptions(resume_from=tmp_path / "other" / "latest.pth", device="cpu"), quiet())


def test_val_split_without_images_trains_without_evaluation(shapes, tmp_path):
    # what `oilleak convert --val-fraction 0` writes: a val.json that lists no images
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    val = data / "annotations" / "val.json"
    val.write_text(json.dumps({**json.loads(val.read_text()), "images": [], "annotations": []}))
    out = io.StringIO()
    cfg = shapes_config(data, tmp_path / "work", train={"epochs": 1, "milestones": [1]})
    result = run_training(cfg, TrainOptions(device="cpu"), Console(file=out, width=200))
    assert (result.epochs_done, result.best, result.stopped_by) == (1, None, None)
    assert "no validation split" in out.getvalue()
    assert f"checkpoint to test and predict with: {tmp_path / 'work' / 'latest.pth'} (no validation split" in out.getvalue()
    assert (tmp_path / "work" / "epoch_1.pth").is_file() and not (tmp_path / "work" / "best.pth").exists()


def _tiny_model(seed: int):
    from oilleak.models.presets import build_model

    torch.manual_seed(seed)
    return build_model(shapes_config(Path("."), Path(".")).model, len(CLASSES))


def test_load_from_and_backbone_weights_are_the_starting_point(shapes, tmp_path):
    # lr 1e-12: one step leaves the weights as they started, so the checkpoint shows where training began
    frozen_lr = {"lr": 1e-12, "warmup_iters": 0}
    source = _tiny_model(seed=123)
    save_checkpoint(tmp_path / "start.pth", model=source, config=shapes_config(shapes, tmp_path))
    out = io.StringIO()
    run_training(shapes_config(shapes, tmp_path / "a", train=frozen_lr),
                 TrainOptions(load_from=str(tmp_path / "start.pth"), max_iters=1, device="cpu"),
                 Console(file=out, width=200))
    assert "tensors loaded" in out.getvalue() and "random weights" not in out.getvalue()
    trained = weights(tmp_path / "a" / "latest.pth")
    for key, value in source.state_dict().items():  # BatchNorm statistics too: not re-estimated
        assert torch.allclose(trained[key].float(), value.float(), atol=1e-6), key

    # an mmdetection checkpoint of a model without mask and semantic heads (as DetectoRS Cascade R-CNN's)
    cascade = {k: v for k, v in source.state_dict().items() if ".mask_head." not in k and ".semantic_head." not in k}
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": cascade, "optimizer": {}}, tmp_path / "mmdet.pth")
    out = io.StringIO()
    run_training(shapes_config(shapes, tmp_path / "m", train=frozen_lr),
                 TrainOptions(load_from=str(tmp_path / "mmdet.pth"), max_iters=1, device="cpu"),
                 Console(file=out, width=200))
    assert "missing (kept initialised)" in out.getvalue()
    trained = weights(tmp_path / "m" / "latest.pth")
    for key, value in cascade.items():
        assert torch.allclose(trained[key].float(), value.float(), atol=1e-6), key

    # torchvision's layout (conv1.weight, layer1.0..., fc.*) of a ResNet with the tiny widths
    resnet = {k[len("backbone."):]: v for k, v in _tiny_model(seed=7).state_dict().items() if k.startswith("backbone.")}
    resnet |= {"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}
    torch.save(resnet, tmp_path / "resnet.pth")
    out = io.StringIO()
    run_training(shapes_config(shapes, tmp_path / "b", train=frozen_lr),
                 TrainOptions(backbone_weights=str(tmp_path / "resnet.pth"), max_iters=1, device="cpu"),
                 Console(file=out, width=200))
    assert "random weights" not in out.getvalue()
    trained = weights(tmp_path / "b" / "latest.pth")
    for key in ("conv1.weight", "layer2.1.conv2.weight", "layer4.2.bn3.running_var"):
        assert torch.allclose(trained[f"backbone.{key}"].float(), resnet[key].float(), atol=1e-6), key
        assert torch.allclose(trained[f"neck.rfp_modules.0.{key}"].float(), resnet[key].float(), atol=1e-6), key
