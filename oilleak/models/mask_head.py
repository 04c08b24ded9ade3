"""The mask head of one HTC stage, its training targets and loss, and pasting masks into the image.

Mask information flow (HTC, Chen et al. 2019, section 3.2): stage t adds a 1x1 projection (``conv_res``) of
stage t-1's mask features to its own input, so every mask head refines the previous one's features.

Shapes: R RoIs, C channels, M x M RoI feature size (14), 2M x 2M mask size (28), K object classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from oilleak.models.box_ops import clip_boxes
from oilleak.models.layers import ConvBlock


class HTCMaskHead(nn.Module):
    """Four 3x3 convs, a 2x deconv and a 1x1 classifier of class-specific mask logits.

    Two steps instead of mmdet's ``return_logits`` / ``return_feat`` flags: ``features(x, previous)`` gives the
    (R, C, M, M) features that the next stage receives, ``logits(features)`` gives the (R, K, 2M, 2M) logits.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 256,
        conv_out_channels: int = 256,
        num_convs: int = 4,
        with_conv_res: bool = True,
        group_norm: bool = False,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else conv_out_channels, conv_out_channels, 3, padding=1, group_norm=group_norm)
            for i in range(num_convs)
        )
        # upsample and conv_logits keep PyTorch's default init, as they do in mmdet (spec errata, §10)
        self.upsample = nn.ConvTranspose2d(conv_out_channels, conv_out_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_out_channels, num_classes, 1)
        self.conv_res = ConvBlock(conv_out_channels, conv_out_channels, 1, group_norm=group_norm) if with_conv_res else None

    def features(self, roi_feats: Tensor, previous: Tensor | None = None) -> Tensor:
        """(R, C, M, M) RoI features (+ the previous stage's mask features) -> (R, C, M, M) mask features."""
        x = roi_feats
        if previous is not None:
            if self.conv_res is None:
                raise ValueError("this mask head has no conv_res: it cannot take a previous stage's features")
            x = x + self.conv_res(previous)
        for conv in self.convs:
            x = conv(x)
        return x

    def logits(self, features: Tensor) -> Tensor:
        """(R, C, M, M) mask features -> (R, K, 2M, 2M) mask logits."""
        return self.conv_logits(F.relu(self.upsample(features)))


def mask_targets(boxes: Tensor, gt_masks: Tensor, gt_index: Tensor, size: int) -> Tensor:
    """Binary (R, size, size) float targets: each box's gt mask cropped and resized by RoIAlign, >= 0.5.

    boxes (R, 4) in the pixels of the (K, h, w) bool ``gt_masks``; gt_index (R,) picks each box's mask.
    Boxes are clipped to the mask first (mmdet's ``mask_target``). RoIAlign reads mask k through the RoI's
    batch index, so no per-RoI copy of the full-size masks is made.
    """
    if boxes.numel() == 0:
        return boxes.new_zeros(0, size, size)
    clipped = clip_boxes(boxes, tuple(gt_masks.shape[-2:]))
    rois = torch.cat([gt_index[:, None].to(boxes.dtype), clipped], dim=1)
    sampled = roi_align(gt_masks[:, None].to(boxes.dtype), rois, size, 1.0, 0, True)
    return (sampled[:, 0] >= 0.5).to(boxes.dtype)


def mask_loss(logits: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
    """BCE-with-logits on each RoI's gt-class channel, averaged over all R * size * size elements.

    With no RoI it is a zero that still belongs to the graph (mmdet: ``mask_preds.sum()``).
    """
    if logits.shape[0] == 0:
        return logits.sum()
    chosen = logits[torch.arange(logits.shape[0], device=logits.device), labels]
    return F.binary_cross_entropy_with_logits(chosen, targets, reduction="mean")


PASTE_CHUNK_BYTES = 256 * 2**20  # working memory of one chunk of masks pasted on the GPU (grid, samples, result)


def paste_mask_crops(
    probs: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float
) -> list[tuple[Tensor, tuple[int, int]]]:
    """Paste (n, S, S) mask probabilities at ``boxes`` in an image of ``image_size`` (H, W), each only into its
    window: per mask the (h, w) bool window and its (x, y) origin in the image.

    mmdet's ``_do_paste_mask``, CPU path, on every device: each mask is sampled by ``grid_sample``
    (bilinear, align_corners=False, zero padding) at the pixel centres of a window reaching 1 px beyond its
    box, then thresholded with ``>=``. Pixels outside that window are False. For a zero-width or -height box
    the infinite normalised coordinates are set to 0 (the mask's centre line), as mmdet does; the window then
    keeps the result a thin line instead of a stripe across the image (which mmdet's GPU path would paste).
    A box outside the image gets an empty window. Memory is that of the windows, not n full images (100
    masks on a 6000x4000 photo would be 2.4 GB as one (n, H, W) array).
    """
    height, width = image_size
    crops = []
    boxes = boxes.float()  # mmdet pastes with float32 boxes and grid whatever the model's dtype
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        left, top = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
        right, bottom = min(math.ceil(x1) + 1, width), min(math.ceil(y1) + 1, height)
        if right <= left or bottom <= top:
            crops.append((torch.zeros(0, 0, dtype=torch.bool, device=probs.device), (0, 0)))
            continue
        box = boxes[i]
        xs = torch.arange(left, right, device=probs.device, dtype=torch.float32) + 0.5
        ys = torch.arange(top, bottom, device=probs.device, dtype=torch.float32) + 0.5
        u = (xs - box[0]) / (box[2] - box[0]) * 2 - 1
        v = (ys - box[1]) / (box[3] - box[1]) * 2 - 1
        u = torch.where(torch.isinf(u), torch.zeros_like(u), u)
        v = torch.where(torch.isinf(v), torch.zeros_like(v), v)
        grid = torch.stack([u[None, :].expand(len(v), -1), v[:, None].expand(-1, len(u))], dim=-1)
        sampled = F.grid_sample(probs[i][None, None].float(), grid[None], align_corners=False)
        crops.append((sampled[0, 0] >= threshold, (left, top)))
    return crops


def paste_masks(
    probs: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float, chunk: int | None = None
) -> Tensor:
    """:func:`paste_mask_crops` as one (n, H, W) bool tensor of full-size masks.

    ``chunk``: paste that many masks at a time over the whole image, window applied as a mask, with no
    host round trip (the default on CUDA: up to 16, fewer on large images, ~13 bytes per pixel and mask
    within ``PASTE_CHUNK_BYTES``): the same pixels, since every pixel is sampled at the same coordinates
    either way. On the CPU one window per mask is faster and smaller (the default there).
    """
    if chunk is None and probs.is_cuda:
        chunk = max(1, min(16, PASTE_CHUNK_BYTES // (13 * image_size[0] * image_size[1])))
    if chunk is not None:
        return _paste_in_chunks(probs, boxes, image_size, threshold, chunk)
    pasted = torch.zeros(len(boxes), *image_size, dtype=torch.bool, device=probs.device)
    for i, (crop, (left, top)) in enumerate(paste_mask_crops(probs, boxes, image_size, threshold)):
        pasted[i, top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    return pasted


def _paste_in_chunks(probs: Tensor, boxes: Tensor, image_size: tuple[int, int], threshold: float, chunk: int) -> Tensor:
    """``paste_masks`` for ``chunk`` masks at a time: each sampled at every pixel centre, then cut to its window."""
    height, width = image_size
    device = probs.device
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    pasted = torch.empty(len(boxes), height, width, dtype=torch.bool, device=device)
    for start in range(0, len(boxes), chunk):
        b = boxes[start : start + chunk].float()  # the per-mask path's arithmetic: float32 boxes and grid
        u = (xs[None, :] - b[:, 0:1]) / (b[:, 2:3] - b[:, 0:1]) * 2 - 1
        v = (ys[None, :] - b[:, 1:2]) / (b[:, 3:4] - b[:, 1:2]) * 2 - 1
        u = torch.where(torch.isinf(u), torch.zeros_like(u), u)
        v = torch.where(torch.isinf(v), torch.zeros_like(v), v)
        count = len(b)
        grid = torch.stack([u[:, None, :].expand(count, height, width), v[:, :, None].expand(count, height, width)], dim=-1)
        sampled = F.grid_sample(probs[start : start + count, None].float(), grid, align_corners=False)[:, 0]
        left = (torch.floor(b[:, 0]) - 1).clamp(min=0)
        top = (torch.floor(b[:, 1]) - 1).clamp(min=0)
        right = (torch.ceil(b[:, 2]) + 1).clamp(max=width)
        bottom = (torch.ceil(b[:, 3]) + 1).clamp(max=height)
        inside_x = (xs[None, :] > left[:, None]) & (xs[None, :] < right[:, None])  # pixel centres x + 0.5
        inside_y = (ys[None, :] > top[:, None]) & (ys[None, :] < bottom[:, None])
        pasted[start : start + count] = (sampled >= threshold) & inside_y[:, :, None] & inside_x[:, None, :]
    return pasted
