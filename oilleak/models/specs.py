"""Model specs: every hyper-parameter of the detector as frozen dataclasses (spec section 1).

A leaf module: it imports only what its fields' types need (``Norm``, the RPN's two settings dataclasses), so
the builder (``presets.py``), the mmdet reader (``mmdet_config.py``) and the modules a spec configures
(``htc.py``) can all import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from oilleak.models.layers import Norm
from oilleak.models.rpn import ProposalSettings, RPNTrainSettings


@dataclass(frozen=True)
class BackboneSpec:
    depth: int = 50
    base_channels: int = 64
    use_aws: bool = True  # every conv weight-standardised (ConvAWS2d)
    stage_with_sac: tuple[bool, bool, bool, bool] = (False, True, True, True)
    frozen_stages: int = 1
    norm_eval: bool = True
    norm: Norm = "batch"

    @property
    def out_channels(self) -> list[int]:
        return [self.base_channels * 4 * 2**i for i in range(4)]


@dataclass(frozen=True)
class RFPSpec:
    """The recursive part of the neck; its second ResNet has its own spec (weights are never shared)."""

    backbone: BackboneSpec = BackboneSpec()
    steps: int = 2
    aspp_out_channels: int = 64
    aspp_dilations: tuple[int, ...] = (1, 3, 6, 1)


@dataclass(frozen=True)
class NeckSpec:
    out_channels: int = 256
    num_outs: int = 5
    rfp: RFPSpec | None = RFPSpec()  # None: a plain FPN (HTC)


@dataclass(frozen=True)
class RPNSpec:
    feat_channels: int = 256
    strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    scales: tuple[float, ...] = (8.0,)
    coder_stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    bbox_loss_beta: float = 1.0 / 9.0
    train: RPNTrainSettings = RPNTrainSettings()
    train_proposals: ProposalSettings = ProposalSettings(nms_pre=2000, max_per_img=2000)
    test_proposals: ProposalSettings = ProposalSettings(nms_pre=1000, max_per_img=1000)


@dataclass(frozen=True)
class CascadeStageSpec:
    """One box + mask stage: its box coder, how its RoIs are labelled and sampled, its loss weight."""

    iou_thr: float  # positive at or above, negative below (HTC: pos_iou_thr = neg_iou_thr = min_pos_iou)
    coder_stds: tuple[float, float, float, float]
    loss_weight: float
    match_low_quality: bool = True  # HTC keeps mmdet's default (Cascade R-CNN sets False)
    num_samples: int = 512  # RoIs per image, ground truths included
    pos_fraction: float = 0.25


HTC_STAGES = (
    CascadeStageSpec(iou_thr=0.5, coder_stds=(0.1, 0.1, 0.2, 0.2), loss_weight=1.0),
    CascadeStageSpec(iou_thr=0.6, coder_stds=(0.05, 0.05, 0.1, 0.1), loss_weight=0.5),
    CascadeStageSpec(iou_thr=0.7, coder_stds=(0.033, 0.033, 0.067, 0.067), loss_weight=0.25),
)


@dataclass(frozen=True)
class RoIHeadSpec:
    # Background + one per class, as oilleak derives the semantic maps; COCO-stuff checkpoints have 183.
    semantic_num_classes: int
    stages: tuple[CascadeStageSpec, ...] = HTC_STAGES
    fc_channels: int = 1024
    mask_channels: int = 256
    mask_num_convs: int = 4
    semantic_channels: int = 256
    semantic_num_convs: int = 4
    semantic_loss_weight: float = 0.2
    featmap_strides: tuple[int, ...] = (4, 8, 16, 32)
    semantic_stride: int = 8
    finest_scale: float = 56.0
    bbox_roi_size: int = 7
    mask_roi_size: int = 14
    group_norm: bool = False  # GroupNorm after the mask and semantic heads' convs (mmdet's GN configs)


@dataclass(frozen=True)
class InferenceSpec:
    score_thr: float = 0.001
    nms_iou: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5
    mask_merge: Literal["mean", "last"] = "last"  # mmdet 3.3's


@dataclass(frozen=True)
class ModelSpec:
    num_classes: int
    roi_head: RoIHeadSpec
    backbone: BackboneSpec = BackboneSpec()
    neck: NeckSpec = NeckSpec()
    rpn: RPNSpec = RPNSpec()
    inference: InferenceSpec = InferenceSpec()
