"""Training survives real faults: a ``kill -9`` in the middle of a checkpoint write, a disk that fills up
during a checkpoint (a real tmpfs of a few MB), and one rank killed under ``torchrun --max-restarts 1``.

Run as a script, this file is the training process the tests kill (``half-write``: it hangs half-way
through writing ``latest.pth``; ``ddp``: one rank of a torchrun job whose rank 1 hangs in its third step).
"""

from __future__ import annotations

import hashlib
import io
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
from rich.console import Console

from typer.testing import CliRunner

from oilleak.cli import app
from oilleak.config import Config, config_from_dict, save_config

HERE = Path(__file__).resolve().parent


def faults_config(data: Path, work: Path, **train) -> Config:
    """The tiny HTC (a checkpoint of about 16 MB), 2 steps per epoch on 2 images (4 with 2 ranks)."""
    sys.path.insert(0, str(HERE))
    from test_train_loop import shapes_config

    base = shapes_config(data, work, train={"epochs": 2, "milestones": [2], **train}).to_dict()
    return config_from_dict({**base, "model": {"preset": "htc_r50_tiny"}})


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), "COLUMNS": "200"}


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {path} appeared: "
                                 f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear in {seconds} s")
        time.sleep(0.05)


def _iteration(checkpoint: Path) -> int:
    from oilleak.models.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)["train_state"]["iteration"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _temporaries(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def shapes2(tmp_path_factory) -> Path:
    from test_train_loop import make_shapes

    return make_shapes(tmp_path_factory.mktemp("shapes2"), images=2, size=96)


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_keeps_the_previous_latest_and_resume_continues(shapes2, tmp_path):
    work, marker = tmp_path / "work", tmp_path / "writing"
    # epoch 1 ends at iteration 2 (epoch_1.pth, linked as latest.pth); --max-iters 3 then writes latest.pth
    # itself, and the worker hangs with half of it written: SIGKILL lands inside atomic_write
    proc = subprocess.Popen([sys.executable, __file__, "half-write", str(shapes2), str(work), str(marker)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    try:
        _wait_for(marker, proc, 240)
        partial = Path(marker.read_text())
        written = partial.stat().st_size
        assert partial.parent == work and written > 1_000_000  # megabytes of it are on disk
        killed_at = time.monotonic() - started
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # what survives: the previous latest.pth, whole, at iteration 2; the half-written file only under its
    # temporary name
    assert _iteration(work / "latest.pth") == 2
    assert _temporaries(work) == [partial.name]

    config = tmp_path / "faults.yaml"
    save_config(faults_config(shapes2, work), config)
    resumed = CliRunner().invoke(app, ["train", str(config), "--resume", "--max-iters", "3", "--device", "cpu"])
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert f"resuming from {work / 'latest.pth'}: epoch 2, step 0/2 of it, iteration 2" in resumed.output
    assert _iteration(work / "latest.pth") == 3
    assert _temporaries(work) == []  # the dead write's temporary was removed when the training resumed
    print(f"SIGKILL {killed_at:.0f} s after the start, {written / 2**20:.1f} MB into writing latest.pth "
          f"at iteration 3; latest.pth (iteration 2) loaded; --resume to iteration 3 took "
          f"{time.monotonic() - started - killed_at:.0f} s")


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test (needs root or CAP_SYS_ADMIN): {exc}")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "48m")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_stops_clearly_and_corrupts_nothing(shapes2, small_disk, tmp_path):
    from oilleak.train.loop import TrainOptions, run_training
    from test_train_loop import quiet

    # a val split without images: no evaluation, and one checkpoint file per save (no best.pth)
    data = tmp_path / "data"
    shutil.copytree(shapes2, data)
    val = data / "annotations" / "val.json"
    val.write_text(json.dumps({**json.loads(val.read_text()), "images": [], "annotations": []}))
    work = small_disk / "work"
    run_training(faults_config(data, work), TrainOptions(max_iters=1, device="cpu"), quiet())
    kept = {name: _digest(work / name) for name in ("latest.pth", "config.yaml")}
    # another program fills the disk: 6 MB stay free, enough for the log and the loss curve, not for the
    # next checkpoint (16 MB)
    filler = small_disk / "filler"
    with filler.open("wb") as f:
        f.write(b"\0" * (shutil.disk_usage(small_disk).free - 6 * 2**20))
    config = tmp_path / "faults.yaml"
    save_config(faults_config(data, work), config)
    # epoch 1 ends at iteration 2, where epoch_1.pth does not fit
    train = ["train", str(config), "--resume", "--max-iters", "2", "--device", "cpu"]
    full = CliRunner().invoke(app, train)
    assert full.exit_code == 2, full.output[-3000:]
    error = " ".join(full.output.split())
    assert "Traceback" not in full.output and isinstance(full.exception, SystemExit)  # exit 2, not a crash
    assert f"could not write the checkpoint {work / 'epoch_1.pth'}: No space left on device" in error
    print(f"the error: {error}")
    assert f"{work / 'latest.pth'} is intact" in error and "--resume" in error
    # nothing corrupted: the checkpoints and config are the bytes they were, no half file is left, the log
    # is whole lines of JSON
    assert {name: _digest(work / name) for name in kept} == kept
    assert _iteration(work / "latest.pth") == 1 and not (work / "epoch_1.pth").exists()
    assert _temporaries(work) == []
    assert all(json.loads(line) for line in (work / "log.jsonl").read_text().splitlines())
    filler.unlink()  # space again: the same command continues
    again = CliRunner().invoke(app, train)
    assert again.exit_code == 0, again.output[-3000:]
    assert _iteration(work / "latest.pth") == 2 and _iteration(work / "epoch_1.pth") == 2


@pytest.fixture(scope="module")
def shapes4(tmp_path_factory) -> Path:
    from test_train_loop import make_shapes

    return make_shapes(tmp_path_factory.mktemp("shapes4"), images=4, size=96)


def _torchrun(data: Path, work: Path, out: Path, hang: Path | None) -> tuple[subprocess.Popen, Path, Path]:
    """The job, and the files its stdout and stderr go to (files: nothing blocks on a full pipe)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.5", __file__, "ddp", str(data), str(work), str(out),
           str(hang or "-")]
    stdout, stderr = out / "stdout.txt", out / "stderr.txt"
    # torchrun shares its rendezvous store with the workers by default, and a restarted rank 0 then reads
    # the dead attempt's gloo address of rank 1 ("Gloo connectFullMesh failed ... Connection refused", seen
    # here with torch 2.14; pytorch/pytorch#135712): restarts need the workers' own store
    env = {**_env(), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with stdout.open("w") as o, stderr.open("w") as e:
        return subprocess.Popen(cmd, env=env, stdout=o, stderr=e, text=True), stdout, stderr


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_restarts_from_latest_and_ends_as_an_uninterrupted_run(shapes4, tmp_path):
    from test_train_loop import assert_same_weights

    started = time.monotonic()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    hang = tmp_path / "rank1.pid"
    interrupted, out, err = _torchrun(shapes4, tmp_path / "work_two", tmp_path / "two", hang)
    try:
        _wait_for(hang, interrupted, 240)  # rank 1 sits in step 3, after epoch 1's checkpoint (iteration 2)
        assert _iteration(tmp_path / "work_two" / "latest.pth") == 2
        os.kill(int(hang.read_text()), signal.SIGKILL)
        killed_at = time.monotonic() - started
        interrupted.wait(timeout=240)
    finally:
        if interrupted.poll() is None:
            interrupted.kill()
    assert interrupted.returncode == 0, err.read_text()[-3000:]
    assert "restarted by torchrun (restart 1)" in out.read_text() and "resuming from" in out.read_text()
    restarted_in = time.monotonic() - started - killed_at

    uninterrupted, _, err = _torchrun(shapes4, tmp_path / "work_one", tmp_path / "one", None)
    uninterrupted.wait(timeout=240)
    assert uninterrupted.returncode == 0, err.read_text()[-3000:]
    for rank in range(2):
        assert_same_weights(torch.load(tmp_path / "one" / f"rank{rank}.pt", weights_only=True),
                            torch.load(tmp_path / "two" / f"rank{rank}.pt", weights_only=True))
    one, two = (torch.load(tmp_path / w / "latest.pth", weights_only=True)["train_state"] for w in ("work_one", "work_two"))
    assert one["iteration"] == two["iteration"] == 4 and one["best"] == two["best"]
    print(f"rank 1 SIGKILLed {killed_at:.0f} s after the start, in step 3 (latest.pth: iteration 2); the "
          f"restarted job ended {restarted_in:.0f} s later at iteration 4; the uninterrupted run took "
          f"{time.monotonic() - started - killed_at - restarted_in:.0f} s")


def _half_write_worker(data: str, work: str, marker: str) -> None:
    from test_train_loop import quiet

    from oilleak.train.loop import TrainOptions, run_training

    real_save = torch.save

    def half_then_hang(obj, f, *args, **kwargs):
        file = getattr(f, "file", f)  # save_checkpoint hands torch.save its open file in a thin wrapper
        name = Path(getattr(file, "name", "")).name
        if not (name.startswith(".latest.pth.") and name.endswith(".tmp")):
            return real_save(obj, f, *args, **kwargs)
        whole = io.BytesIO()
        real_save(obj, whole, *args, **kwargs)
        file.write(whole.getbuffer()[: whole.tell() // 2])
        file.flush()
        os.fsync(file.fileno())
        Path(marker).write_text(str(Path(file.name).resolve()))
        time.sleep(600)  # the test kills the process here

    torch.save = half_then_hang
    run_training(faults_config(Path(data), Path(work)), TrainOptions(max_iters=3, device="cpu"), quiet())


def _ddp_worker(data: str, work: str, out: str, hang: str) -> None:
    from test_train_loop import quiet

    from oilleak.data.dataset import CocoDataset
    from oilleak.train.loop import TrainOptions, run_training

    rank = int(os.environ["RANK"])
    if hang != "-" and rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        real_getitem, calls = CocoDataset.__getitem__, []

        def hanging_getitem(self, index):
            calls.append(index)
            if len(calls) == 3:  # the batch of step 3: epoch 1 and its checkpoint are done
                Path(hang).write_text(str(os.getpid()))
                time.sleep(600)  # the test kills this rank here
            return real_getitem(self, index)

        CocoDataset.__getitem__ = hanging_getitem
    console = Console(width=200) if rank == 0 else quiet()  # rank 0's messages go to torchrun's stdout
    result = run_training(faults_config(Path(data), Path(work)), TrainOptions(device="cpu"), console)
    torch.save(result.model.state_dict(), Path(out) / f"rank{rank}.pt")
    if rank == 0:
        print(f"trained to iteration {result.iterations}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    mode, *args = sys.argv[1:]
    {"half-write": _half_write_worker, "ddp": _ddp_worker}[mode](*args)
