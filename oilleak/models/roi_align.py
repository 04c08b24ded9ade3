"""RoIAlign as mmdet configures it (``sampling_ratio=0, aligned=True``), on every CPU core at inference.

torchvision's CPU kernel loops over the RoIs in one thread. Each RoI's output depends on that RoI and the
feature map only, so at inference the RoIs are dealt round-robin to as many threads as PyTorch uses (the op
releases the GIL) and the parts are put back in order: the same numbers, bit for bit, in about 1/threads
of the time. (Round-robin, because RoI sizes, and so their sampling cost, vary with the proposal's rank.)
With autograd, on GPUs, for few RoIs or while tracing (the ONNX export records one RoiAlign) the op runs as
one call.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torchvision.ops import roi_align as torchvision_roi_align

MIN_ROIS_PER_THREAD = 8
_pool: ThreadPoolExecutor | None = None


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers != threads:
        _pool = ThreadPoolExecutor(threads, thread_name_prefix="oilleak-roi-align")
    return _pool


def roi_align(feat: Tensor, rois: Tensor, output_size: int, spatial_scale: float) -> Tensor:
    """(N, C, H, W) features, (R, 5) RoIs (image index, x1, y1, x2, y2) -> (R, C, output_size, output_size)."""
    threads = min(torch.get_num_threads(), len(rois) // MIN_ROIS_PER_THREAD)
    if (threads < 2 or feat.device.type != "cpu" or torch.jit.is_tracing()
            or (torch.is_grad_enabled() and feat.requires_grad)):
        return torchvision_roi_align(feat, rois, output_size, spatial_scale, 0, True)
    parts = list(_executor(threads).map(
        lambda k: torchvision_roi_align(feat, rois[k::threads], output_size, spatial_scale, 0, True), range(threads)
    ))
    out = feat.new_empty(len(rois), *parts[0].shape[1:])
    for k, part in enumerate(parts):
        out[k::threads] = part
    return out
