"""The model as `predict`, `test` and `serve` run it: eval mode, BatchNorm folded, channels-last on CPU.

Both steps change only float rounding (the trunk's stage rows still match mmdet's fixtures to 1e-4, float64
end to end to 1e-6: tests/test_fold_batchnorm.py) and make CPU inference faster: folding removes one pass
over the activations per backbone BatchNorm, and channels-last ("NHWC") memory lets oneDNN run every
convolution without reordering its input and output (the first convolution's channels-last weight makes its
output channels-last, and the layout then carries through). Measured in BENCHMARKS.md ("Model inference").
Channels-last stays off on GPUs, where it has not been measured.
"""

from __future__ import annotations

import torch
from torch import nn

from oilleak.models.fold_batchnorm import fold_frozen_batchnorm


def prepare_for_inference(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` moved to ``device`` and made ready to predict, in place (it can no longer be trained)."""
    device = torch.device(device)
    model = fold_frozen_batchnorm(model.to(device).eval())
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model
