"""One process or many: the device, the rank, and the few collectives training, test and predict need.

``torchrun --nproc_per_node N -m oilleak train ...`` starts N copies of the same command and tells each
its place through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...). Without
those variables training runs in one process on one device. On CUDA ranks talk over NCCL, on CPU over gloo.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from oilleak.errors import OilleakError

# Rank 0 evaluates while the others wait in a collective; a large validation set on a slow machine must
# not trip the timeout, while a rank that died still ends the job within the hour.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | None) -> torch.device:
    """The ``--device`` of a command: cpu, cuda or cuda:N (None: cuda when available), checked to exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OilleakError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OilleakError(
                f"--device {device}: no CUDA GPU is visible to PyTorch; use --device cpu or check CUDA_VISIBLE_DEVICES"
            )
        if dev.index is not None and dev.index >= count:
            raise OilleakError(f"--device {device}: only {count} GPU(s) are visible (cuda:0 .. cuda:{count - 1})")
    return dev


def _pick_device(requested: str | None, local_rank: int) -> torch.device:
    if requested not in (None, "cpu", "cuda"):
        raise OilleakError(f"--device {requested!r}: use 'cpu' or 'cuda' (with torchrun each rank takes cuda:LOCAL_RANK)")
    if resolve_device(requested).type == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise OilleakError(
            f"this process is local rank {local_rank} but only {count} GPU(s) are visible; "
            f"set torchrun --nproc_per_node to at most {count} or list more GPUs in CUDA_VISIBLE_DEVICES"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def start(requested_device: str | None) -> Runtime:
    """Read torchrun's environment (if any), pick the device and join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        except RuntimeError as exc:
            _explain_restart_failure(exc)
            raise
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _explain_restart_failure(exc: RuntimeError) -> None:
    """A job torchrun restarted (--max-restarts) whose processes cannot connect: with the rendezvous store
    that torchrun shares with its workers by default, a restarted rank can read the dead attempt's address
    of another (pytorch/pytorch#135712; met with torch 2.14 and gloo)."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart != "0" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise OilleakError(
            f"torchrun restarted this job (restart {restart}) but its processes could not connect "
            f"({str(exc).splitlines()[0][:200]}): torchrun's shared rendezvous store can hand a restarted job the "
            "addresses of the processes that died. Run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its "
            "environment; the job then continues from its latest.pth"
        ) from None


def start_if_launched(requested_device: str | None) -> Runtime:
    """``start`` under torchrun (``WORLD_SIZE`` > 1); a plain run keeps ``--device`` as given (cuda:N too)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return start(requested_device)
    return Runtime(rank=0, world_size=1, local_rank=0, device=resolve_device(requested_device))


def launched_as_main() -> bool:
    """True in a plain run and in torchrun's rank 0: the process that prints the command's results."""
    return int(os.environ.get("RANK", "0")) == 0


def stop(runtime: Runtime) -> None:
    """Leave the process group; only after a clean, agreed end (every rank gets here)."""
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_across_ranks(values: list[float], runtime: Runtime) -> list[float]:
    if not runtime.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather(obj: Any, runtime: Runtime) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not runtime.distributed:
        return [obj]
    out: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any, runtime: Runtime) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 only (None on the others): results too large to copy
    to every rank, such as the detections of a whole split."""
    if not runtime.distributed:
        return [obj]
    out: list[Any] | None = [None] * runtime.world_size if runtime.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def shard(count: int, runtime: Runtime) -> range:
    """The items of this rank among ``count``: every world_size-th, starting at its rank (sizes differ by at
    most one, and ``unshard`` restores the original order)."""
    return range(runtime.rank, count, runtime.world_size)


def unshard(parts: list[list[Any]]) -> list[Any]:
    """The ranks' ``shard`` results (rank order) back in the order of the items."""
    return [part[i] for i in range(max(map(len, parts), default=0)) for part in parts if i < len(part)]


def raise_if_any_failed(error: str | None, runtime: Runtime) -> None:
    """Every rank reports its error (or None); each raises the first one, naming the rank it came from, so
    no rank waits in a collective for one that has given up."""
    errors = gather(error, runtime)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        raise OilleakError(message if not runtime.distributed else f"rank {rank}: {message}")


def from_main(obj: Any, runtime: Runtime) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not runtime.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers_from_main(module: torch.nn.Module, runtime: Runtime) -> None:
    """Rank 0's buffers (e.g. BatchNorm statistics) in ``module`` on every rank."""
    if runtime.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


# DistributedDataParallel's option not to broadcast the buffers before each forward: ``forward_sync_buffers``
# since torch 2.13 (``broadcast_buffers`` is deprecated there), ``broadcast_buffers`` before.
NO_BUFFER_BROADCAST = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()
