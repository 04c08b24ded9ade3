"""Training pieces that need no model: schedule, data order, RNG state, checkpoint files, plots."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from oilleak.config import TrainConfig
from oilleak.train.schedule import build_optimizer, choose_lr, cosine_factor, lr_at, run_progress, step_factor, warmup_factor
from oilleak.train.sample_order import EpochBatches
from oilleak.train.log import grouped_losses, plot_curves
from oilleak.train.state import CheckpointFiles, capture_rng, existing_outputs, restore_rng


# ---------------------------------------------------------------------------------------------- schedule


def test_warmup_matches_mmdet3_linear_lr():
    # mmengine LinearLR(start_factor=0.001, begin=0, end=500) by iteration: factor(i) =
    # 0.001 + 0.999 * i / 499 for i < 500 (its total_iters is end - begin - 1), then 1.
    cfg = TrainConfig()
    assert warmup_factor(0, cfg) == pytest.approx(0.001)
    assert warmup_factor(1, cfg) == pytest.approx(0.001 + 0.999 / 499)
    assert warmup_factor(250, cfg) == pytest.approx(0.001 + 0.999 * 250 / 499)
    assert warmup_factor(498, cfg) == pytest.approx(0.001 + 0.999 * 498 / 499)
    assert warmup_factor(499, cfg) == 1.0
    assert warmup_factor(10_000, cfg) == 1.0
    assert warmup_factor(0, TrainConfig(warmup_iters=0)) == 1.0
    assert warmup_factor(0, TrainConfig(warmup_iters=1)) == 1.0


def test_steps_after_epochs_8_and_11():
    cfg = TrainConfig(load_from="detectors.pth")  # with loaded weights "auto" is mmdetection's step schedule
    # epochs are 0-based here: the 9th epoch (index 8) is the first at 0.1x, as mmdet's MultiStepLR([8, 11])
    assert [step_factor(e, cfg) for e in (0, 7, 8, 10, 11)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert lr_at(0.02, 100_000, 11, cfg) == pytest.approx(0.0002)
    assert lr_at(0.02, 0, 0, cfg) == pytest.approx(0.02 * 0.001)


def test_cosine_runs_from_lr_to_min_lr_ratio_over_the_run():
    cfg = TrainConfig(lr_schedule="cosine", min_lr_ratio=0.01, warmup_iters=0)
    # 0.01 + 0.99 * (1 + cos(pi p)) / 2 at p = 0, 1/4, 1/2, 1 and past the end
    assert [cosine_factor(p, cfg) for p in (0, 0.25, 0.5, 1.0, 1.5)] == pytest.approx(
        [1.0, 0.01 + 0.99 * (1 + 2**-0.5) / 2, 0.505, 0.01, 0.01])
    assert lr_at(0.02, 300, 5, cfg, progress=0.5) == pytest.approx(0.02 * 0.505)  # milestones do not apply
    # "auto": cosine from random weights, step with weights to start from
    assert lr_at(0.02, 600, 9, TrainConfig(), progress=0.5) == pytest.approx(0.02 * 0.505)
    assert lr_at(0.02, 600, 9, TrainConfig(backbone_weights="r50.pth"), progress=0.5) == pytest.approx(0.002)
    # progress: iterations over all epochs' iterations, or training time over the budget, whichever is further
    assert run_progress(30, 120, 1e9, cfg) == pytest.approx(0.25)
    timed = TrainConfig(time_budget_s=600)
    assert run_progress(30, 120, 450.0, timed) == pytest.approx(0.75)
    assert run_progress(90, 120, 150.0, timed) == pytest.approx(0.75)


def test_choose_lr_auto_scale_and_hint():
    cfg = TrainConfig()
    lr, line = choose_lr(cfg, total_batch=4, auto_scale=True)  # 2 GPUs x 2 images
    assert lr == pytest.approx(0.005)
    assert "0.005" in line and "--auto-scale-lr" in line
    lr, line = choose_lr(cfg, total_batch=4, auto_scale=False)
    assert lr == 0.02
    assert "--auto-scale-lr" in line and "0.005" in line  # the hint names the scaled lr
    lr, line = choose_lr(cfg, total_batch=16, auto_scale=False)
    assert lr == 0.02 and "--auto-scale-lr" not in line and "warning" not in line
    lr, line = choose_lr(cfg, total_batch=2, auto_scale=False)  # configs/oilleak.yaml on one GPU
    assert line.startswith("warning: lr 0.02 for a total batch of 2, 8x fewer") and "0.0025" in line


def test_optimizer_takes_only_trainable_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    opt = build_optimizer(model, TrainConfig(), lr=0.01)
    params = opt.param_groups[0]["params"]
    assert len(params) == 2 and all(p is q for p, q in zip(params, model[1].parameters()))
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-4


# ---------------------------------------------------------------------------------------------- data order


def _epoch(batches: EpochBatches, epoch: int, start: int = 0) -> list[list[int]]:
    batches.set_position(epoch, start)
    return list(batches)


def test_epoch_batches_cover_the_data_in_a_seeded_order():
    batches = EpochBatches(10, batch_size=3, seed=7)
    first = _epoch(batches, 0)
    assert [len(b) for b in first] == [3, 3, 3, 1]
    assert sorted(i for b in first for i in b) == list(range(10))
    assert first == _epoch(EpochBatches(10, batch_size=3, seed=7), 0)  # same seed, same order
    assert first != _epoch(batches, 1)  # another epoch, another order
    assert first != _epoch(EpochBatches(10, batch_size=3, seed=8), 0)


def test_epoch_batches_start_mid_epoch():
    batches = EpochBatches(10, batch_size=3, seed=0)
    full = _epoch(batches, 2)
    tail = _epoch(batches, 2, start=2)
    assert tail == full[2:] and len(batches) == 2


def test_epoch_batches_group_images_by_orientation_as_mmdet():
    """mmdet's AspectRatioBatchSampler, by hand: walking the epoch order, a bucket per orientation yields when
    full; the leftovers follow in order. Resuming mid-epoch gives the same batches."""
    portrait = [i % 3 == 0 for i in range(10)]  # samples 0, 3, 6, 9 are portrait
    batches = EpochBatches(10, batch_size=3, seed=7, portrait=portrait)
    order = batches.epoch_order(0)
    expected, buckets = [], {False: [], True: []}
    for i in order:
        buckets[portrait[i]].append(i)
        if len(buckets[portrait[i]]) == 3:
            expected.append(buckets[portrait[i]])
            buckets[portrait[i]] = []
    left = buckets[True] + buckets[False]  # mmdet: the portrait leftovers first
    expected += [left[i : i + 3] for i in range(0, len(left), 3)]
    first = _epoch(batches, 0)
    assert first == expected and len(first) == batches.steps_per_epoch == 4
    assert sum(len({portrait[i] for i in b}) == 1 for b in first) == 4  # here even the leftover is pure
    assert sorted(i for b in first for i in b) == list(range(10))
    assert _epoch(batches, 0, start=2) == first[2:]
    assert _epoch(EpochBatches(10, batch_size=3, seed=7, portrait=portrait), 1) == _epoch(batches, 1)
    mixed = _epoch(EpochBatches(10, batch_size=3, seed=7), 0)
    assert any(len({portrait[i] for i in b}) == 2 for b in mixed)  # without groups, this order mixes


def test_epoch_batches_split_across_ranks():
    ranks = [EpochBatches(7, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    per_rank = [_epoch(b, 0) for b in ranks]
    assert [len(p) for p in per_rank] == [2, 2]  # the same number of steps on every rank
    seen = [i for p in per_rank for b in p for i in b]
    assert len(seen) == 8 and set(seen) == set(range(7))  # 7 samples padded to 8 by repeating one
    assert ranks[0].epoch_order(0)[:7] == _epoch(EpochBatches(7, batch_size=7, seed=3), 0)[0]


# ---------------------------------------------------------------------------------------------- state


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    torch.save({"rng": state}, tmp_path / "s.pth")
    loaded = torch.load(tmp_path / "s.pth", weights_only=True)["rng"]
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(loaded)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def _fake_save(path, *, model, config, extra):
    path.write_text(json.dumps(extra["train_state"]))


def test_checkpoint_files_keep_last_k_latest_and_best(tmp_path, monkeypatch):
    monkeypatch.setattr("oilleak.train.state.save_checkpoint", _fake_save)
    files = CheckpointFiles(tmp_path, keep=2)
    for epoch, best in ((1, True), (2, False), (3, True), (4, False)):
        files.save_epoch(epoch, model=None, config=None, train_state={"epoch": epoch}, is_best=best)
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pth")) == ["epoch_3.pth", "epoch_4.pth"]
    assert json.loads(files.latest.read_text()) == {"epoch": 4}
    assert json.loads(files.best.read_text()) == {"epoch": 3}
    assert files.latest.stat().st_ino == (tmp_path / "epoch_4.pth").stat().st_ino  # one copy on disk
    assert not list(tmp_path.glob(".*tmp"))
    assert existing_outputs(tmp_path) == ["latest.pth", "best.pth", "epoch_3.pth", "epoch_4.pth"]
    assert existing_outputs(tmp_path / "absent") == []


def test_loss_curve_png(tmp_path):
    records = [{"type": "train", "epoch": 1, "iter": i, "loss": 2.0 / i, "loss_rpn_cls": 1.0 / i, "lr": 0.01}
               for i in range(1, 6)]
    records.append({"type": "val", "epoch": 1, "iter": 5, "segm_mAP": 0.3, "bbox_mAP": 0.4})
    plot_curves(records, tmp_path / "loss_curve.png")
    with Image.open(tmp_path / "loss_curve.png") as png:
        assert png.size[0] > 500 and png.size[1] > 200


def test_progress_bar_groups_the_loss_terms():
    losses = {"loss_rpn_cls": 0.25, "loss_rpn_bbox": 0.5, "loss_semantic_seg": 0.125, "s0.loss_cls": 1.0,
              "s0.acc": 90.0, "s0.loss_mask": 2.0, "s2.loss_bbox": 4.0}
    assert grouped_losses(losses) == {"rpn": 0.75, "semantic": 0.125, "s0": 3.0, "s2": 4.0}  # acc is no loss


def test_nan_stop_advice_without_a_checkpoint_says_to_change_or_empty_the_work_dir(tmp_path):
    from oilleak.train.stops import diverged_advice

    advice = diverged_advice(None, tmp_path / "run")
    assert "no checkpoint was written yet" in advice and "--resume" not in advice
    assert "another --work-dir" in advice and f"emptying {tmp_path / 'run'}" in advice
    advice = diverged_advice(tmp_path / "run" / "latest.pth", tmp_path / "run")
    assert f"last good checkpoint is {tmp_path / 'run' / 'latest.pth'}" in advice and advice.endswith("or --resume.")
