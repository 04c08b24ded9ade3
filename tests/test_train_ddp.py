"""Two training processes on CPU (gloo): both train the same model, the model one process trains at the
same total batch; an exception on one rank ends both.

Run as a script, this file is one rank of such a training (the tests start it under torchrun, or as two
plain processes to show the ranks stop each other without torchrun's agent), or, without torchrun, the
one process to compare with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _worker(data_root: str, work_dir: str, out_dir: str, max_iters: int, fail_rank: int, batch_size: int = 1,
            exact: bool = False) -> None:
    sys.path.insert(0, str(HERE))
    from test_train_loop import quiet, shapes_config

    from oilleak.config import config_from_dict
    from oilleak.data.dataset import CocoDataset
    from oilleak.train.loop import TrainOptions, run_training

    rank = int(os.environ.get("RANK", "0"))
    order: list[int] = []  # the training images this process loads, in order
    if exact:
        _train_exactly(order)
    if rank == fail_rank:
        real_getitem, calls = CocoDataset.__getitem__, []

        def failing_getitem(self, index):
            calls.append(index)
            if len(calls) == 4:  # 2 batches set the BatchNorm statistics, then training step 2
                raise RuntimeError(f"injected failure on rank {rank}")
            return real_getitem(self, index)

        CocoDataset.__getitem__ = failing_getitem
    data = {"batch_size": batch_size, "flip_prob": 0.0} if exact else {}  # a flip is drawn per rank
    cfg = shapes_config(Path(data_root), Path(work_dir), train={"epochs": 2, "milestones": [2]}, data=data)
    if exact:  # HTC without DetectoRS' deformable convs (its float32 noise is larger); the same DDP code path
        cfg = config_from_dict({**cfg.to_dict(), "model": {"preset": "htc_r50_tiny"}})
    result = run_training(cfg, TrainOptions(max_iters=max_iters, device="cpu"), quiet())
    torch.save(result.model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    (Path(out_dir) / f"order{rank}.json").write_text(json.dumps(order))


def _train_exactly(order: list[int]) -> None:
    """Make 2 ranks x batch 1 and 1 process x batch 2 compute the same steps, up to float64 rounding, and
    record the images loaded into ``order``.

    Three things differ between them by design, removed here: each rank draws its anchor / RoI samples from
    its own random stream (here: the first k candidates everywhere); the mask loss is a mean over the
    positive RoIs of the whole batch, which weighs an image with more positives more than DDP's mean of the
    ranks' gradients (here: one positive per image and stage, as every ground truth is a positive candidate;
    the other losses divide by the samples of the batch, 32 per image here, which every image has); and
    float32 convolutions of a batch of 2 round differently from two of 1 (a relative 1.6e-5 in the
    gradients measured on this model, 6e-11 in float64): here the model and its input are float64.
    """
    from oilleak.data.dataset import CocoDataset
    from oilleak.models import presets
    from oilleak.models.box_ops import RandomSampler
    from oilleak.structures import Batch

    real_init = RandomSampler.__init__

    def one_positive(self, *, num, pos_fraction, add_gt_as_proposals, generator=None):
        real_init(self, num=32, pos_fraction=1.5 / 32, add_gt_as_proposals=add_gt_as_proposals, generator=generator)

    RandomSampler.__init__ = one_positive
    RandomSampler._choose = lambda self, candidates, count: candidates[:count]
    real_build, real_to, real_getitem = presets.build_model, Batch.to, CocoDataset.__getitem__
    presets.build_model = lambda *args, **kwargs: real_build(*args, **kwargs).double()
    Batch.to = lambda self, device: real_to(dataclasses.replace(self, images=self.images.double()), device)

    def recording_getitem(self, index):
        if self.train:
            order.append(index)
        return real_getitem(self, index)

    CocoDataset.__getitem__ = recording_getitem


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shapes4(tmp_path_factory) -> Path:
    from test_train_loop import make_shapes

    return make_shapes(tmp_path_factory.mktemp("shapes4"), images=4, size=96)


def _env() -> dict[str, str]:
    # INFO: a parameter without a gradient (find_unused_parameters is off) fails the next step with its name.
    # DETAIL also checks that the ranks agree on every collective, but torch 2.14.1 on CPU crashes (SIGSEGV) when
    # it builds any DistributedDataParallel with DETAIL; bench/gpu_check.sh trains 2 ranks with DETAIL.
    debug = os.environ.get("TORCH_DISTRIBUTED_DEBUG", "INFO")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), "TORCH_DISTRIBUTED_DEBUG": debug}


def test_a_batch_without_ground_truth_gives_every_trainable_parameter_a_gradient():
    """Why DistributedDataParallel runs with find_unused_parameters=False: no parameter is left out of a step,
    even when no image of the batch has an object (the mask heads get an empty loss, as in mmdet)."""
    from oilleak.models.presets import PRESETS, build_from_spec
    from oilleak.structures import ImageMeta, Targets

    torch.manual_seed(0)
    model = build_from_spec(PRESETS["detectors_htc_r50_tiny"](2)).train()
    meta = ImageMeta(image_id=0, file_name="x.png", ori_shape=(96, 96), img_shape=(96, 96), pad_shape=(96, 96),
                     scale_factor=(1.0, 1.0))
    nothing = Targets(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long),
                      masks=torch.zeros(0, 96, 96, dtype=torch.bool), sem_seg=torch.zeros(96, 96, dtype=torch.uint8))
    losses = model(torch.randn(1, 3, 96, 96), [meta], [nothing])
    sum(v for k, v in losses.items() if "loss" in k).backward()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any(name.startswith("roi_head.mask_head.2.") for name in trainable)
    assert [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_two_ranks_train_the_same_model(shapes4, tmp_path):
    # 4 images, 2 ranks x batch 1: 2 steps per epoch; 3 steps cross an epoch end (evaluation on rank 0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "test_train_ddp.py"), str(shapes4), str(tmp_path / "work"), str(tmp_path), "3", "-1"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    state = torch.load(tmp_path / "work" / "latest.pth", weights_only=True)
    assert state["train_state"]["iteration"] == 3 and state["train_state"]["world_size"] == 2
    assert len(state["train_state"]["rng"]) == 2  # each rank's RNG, for an exact resume
    for key in rank0:  # and what rank 0 saved is what both ranks hold
        assert torch.equal(rank0[key], state["state_dict"][key]), key
    initial = torch.load(tmp_path / "work" / "epoch_1.pth", weights_only=True)["state_dict"]
    assert any(not torch.equal(initial[k], rank0[k]) for k in rank0)  # it did train after epoch 1


# 2 ranks x batch 1 against 1 process x batch 2, 2 steps in float64 (see _train_exactly): the weights differed
# by up to 4.3e-13 (sums in another order: DDP averages two gradients, one process takes one batch), judged
# at 10 times that. The steps moved them by up to 7.8e-3: a DDP that summed the gradients instead of
# averaging them, or ranks that trained on the same images, would differ on the scale of a step.
DDP_TOLERANCE = 10 * 4.3e-13
STEP_AT_LEAST = 1e-3


@pytest.mark.slow
def test_two_ranks_train_what_one_process_trains_at_the_same_total_batch(shapes4, tmp_path):
    from oilleak.config import ModelConfig
    from oilleak.models.presets import build_model

    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    script = [str(HERE / "test_train_ddp.py"), str(shapes4)]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script,
           str(two / "work"), str(two), "2", "-1", "1", "exact"]
    single = [sys.executable, *script, str(one / "work"), str(one), "2", "-1", "2", "exact"]
    for cmd in (ddp, single):
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    # the same images in each step: rank 0 and rank 1 take the first and the second of each pair one process takes
    order = [json.loads((d / f"order{r}.json").read_text()) for d, r in ((one, 0), (two, 0), (two, 1))]
    assert len(order[0]) == 4 and sorted(order[0]) == [0, 1, 2, 3]
    assert [sorted(order[0][2 * s: 2 * s + 2]) for s in range(2)] == [sorted([order[1][s], order[2][s]]) for s in range(2)]
    ddp_weights = torch.load(two / "rank0.pt", weights_only=True)
    one_weights = torch.load(one / "rank0.pt", weights_only=True)
    torch.manual_seed(0)  # train.seed: the weights both trainings started from (GroupNorm from random weights)
    start = build_model(ModelConfig(preset="htc_r50_tiny", norm="group"), 2).state_dict()
    keys = [k for k in one_weights if one_weights[k].is_floating_point() and one_weights[k].numel()]
    worst = max((ddp_weights[k].double() - one_weights[k].double()).abs().max().item() for k in keys)
    step = max((one_weights[k].double() - start[k].double()).abs().max().item() for k in keys)
    print(f"2 ranks x batch 1 vs 1 process x batch 2: weights differ by up to {worst:.3g}; the steps moved them by up to {step:.3g}")
    assert worst <= DDP_TOLERANCE, f"weights differ by up to {worst}"
    assert step >= STEP_AT_LEAST
    sizes = [torch.load(d / "work" / "latest.pth", weights_only=True)["train_state"]["world_size"] for d in (two, one)]
    assert sizes == [2, 1]


def test_an_exception_on_one_rank_stops_both(shapes4, tmp_path):
    port = str(_free_port())
    procs = []
    for rank in range(2):  # plain processes: no torchrun agent to kill the survivor
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        cmd = [sys.executable, str(HERE / "test_train_ddp.py"), str(shapes4), str(tmp_path / "work"), str(tmp_path),
               "4", "1"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=240) for p in procs]  # a hang fails here
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode != 0 and "injected failure on rank 1" in outputs[1][1]
    assert procs[0].returncode != 0
    assert "rank 1 (RuntimeError: injected failure on rank 1) failed" in outputs[0][1], outputs[0][1][-2000:]
    assert not (tmp_path / "rank0.pt").exists() and not (tmp_path / "rank1.pt").exists()


if __name__ == "__main__":
    data_root, work_dir, out_dir, max_iters, fail_rank = sys.argv[1:6]
    batch_size, exact = (int(sys.argv[6]), sys.argv[7] == "exact") if len(sys.argv) > 6 else (1, False)
    _worker(data_root, work_dir, out_dir, int(max_iters), int(fail_rank), batch_size, exact)
