"""Model specs: every hyper-parameter of the detector as frozen dataclasses (spec section 1), the four named
presets, and one builder that turns a spec into modules by calling their constructors.

Two ways in, one way to build:
- ``build_model(config.model, num_classes)``: a preset by name (``detectors_htc_r50``, ``htc_r50`` and their
  ``_tiny`` versions), with the test settings of ``config.model``;
- ``oilleak.models.mmdet_config.model_from_mmdet_config(model_dict)``: an mmdet ``model=dict(...)`` (such as
  a parity fixture's ``model_config``) read into a ``ModelSpec``; anything oilleak does not implement is
  refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from oilleak.config import ModelConfig
from oilleak.models.bbox_head import Shared2FCBBoxHead
from oilleak.models.box_ops import MaxIoUAssigner, RandomSampler
from oilleak.models.detector import HybridTaskCascade
from oilleak.models.fpn import FPN
from oilleak.models.htc import HybridTaskCascadeRoIHead
from oilleak.models.layers import Norm
from oilleak.models.mask_head import HTCMaskHead
from oilleak.models.resnet import ResNet
from oilleak.models.rfp import RFP
from oilleak.models.rpn import AnchorGenerator, ProposalSettings, RPNHead, RPNTrainSettings
from oilleak.models.semantic_head import FusedSemanticHead


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


# ------------------------------------------------------------------------------------------------ presets


def detectors_htc_r50(num_classes: int) -> ModelSpec:
    """mmdet's detectors_htc-r50_1x_coco: ResNet-50 with AWS + SAC, RFP neck, HTC head."""
    return ModelSpec(num_classes=num_classes, roi_head=RoIHeadSpec(semantic_num_classes=num_classes + 1))


def htc_r50(num_classes: int) -> ModelSpec:
    """mmdet's htc_r50_fpn_1x_coco: plain ResNet-50, FPN, HTC head."""
    plain = BackboneSpec(use_aws=False, stage_with_sac=(False, False, False, False))
    return replace(detectors_htc_r50(num_classes), backbone=plain, neck=NeckSpec(rfp=None))


def _tiny(spec: ModelSpec) -> ModelSpec:
    """Same architecture at the parity fixtures' widths (base 16, 32-channel pyramid, 8-channel ASPP
    branches, 64-wide fcs, 32-channel mask / semantic heads): for tests and CPU experiments."""
    backbone = replace(spec.backbone, base_channels=16)
    rfp = spec.neck.rfp and replace(spec.neck.rfp, backbone=replace(spec.neck.rfp.backbone, base_channels=16), aspp_out_channels=8)
    return replace(
        spec,
        backbone=backbone,
        neck=replace(spec.neck, out_channels=32, rfp=rfp),
        rpn=replace(spec.rpn, feat_channels=32),
        roi_head=replace(spec.roi_head, fc_channels=64, mask_channels=32, semantic_channels=32),
    )


PRESETS: dict[str, Callable[[int], ModelSpec]] = {
    "detectors_htc_r50": detectors_htc_r50,
    "htc_r50": htc_r50,
    "detectors_htc_r50_tiny": lambda num_classes: _tiny(detectors_htc_r50(num_classes)),
    "htc_r50_tiny": lambda num_classes: _tiny(htc_r50(num_classes)),
}


def with_norm(spec: ModelSpec, norm: Norm) -> ModelSpec:
    """``spec`` with ``norm`` in both ResNets and, for GroupNorm, in the mask and semantic heads' convs."""
    rfp = spec.neck.rfp and replace(spec.neck.rfp, backbone=replace(spec.neck.rfp.backbone, norm=norm))
    return replace(
        spec,
        backbone=replace(spec.backbone, norm=norm),
        neck=replace(spec.neck, rfp=rfp),
        roi_head=replace(spec.roi_head, group_norm=norm == "group"),
    )


def preset_spec(model_cfg: ModelConfig, num_classes: int) -> ModelSpec:
    """The named preset with the norm and test settings of ``model_cfg``."""
    spec = with_norm(PRESETS[model_cfg.preset](num_classes), model_cfg.resolved_norm())
    inference = InferenceSpec(
        score_thr=model_cfg.score_thr,
        nms_iou=model_cfg.nms_iou,
        max_per_img=model_cfg.max_per_img,
        mask_thr=model_cfg.mask_thr,
        mask_merge=model_cfg.mask_merge,
    )
    return replace(spec, inference=inference)


def build_model(model_cfg: ModelConfig, num_classes: int) -> HybridTaskCascade:
    return build_from_spec(preset_spec(model_cfg, num_classes))


# ------------------------------------------------------------------------------------------------ builder


def _resnet(spec: BackboneSpec, rfp_inplanes: int | None = None) -> ResNet:
    return ResNet(
        depth=spec.depth,
        base_channels=spec.base_channels,
        use_aws=spec.use_aws,
        stage_with_sac=spec.stage_with_sac,
        frozen_stages=spec.frozen_stages,
        norm_eval=spec.norm_eval,
        rfp_inplanes=rfp_inplanes,
        norm=spec.norm,
    )


def _neck(spec: NeckSpec, in_channels: list[int]) -> FPN:
    if spec.rfp is None:
        return FPN(in_channels=in_channels, out_channels=spec.out_channels, num_outs=spec.num_outs)
    return RFP(
        in_channels=in_channels,
        out_channels=spec.out_channels,
        num_outs=spec.num_outs,
        rfp_backbone=_resnet(spec.rfp.backbone, rfp_inplanes=spec.out_channels),
        aspp_out_channels=spec.rfp.aspp_out_channels,
        aspp_dilations=spec.rfp.aspp_dilations,
        rfp_steps=spec.rfp.steps,
    )


def build_rpn_head(spec: RPNSpec, in_channels: int) -> RPNHead:
    return RPNHead(
        in_channels=in_channels,
        feat_channels=spec.feat_channels,
        anchor_generator=AnchorGenerator(strides=spec.strides, ratios=spec.ratios, scales=spec.scales),
        train_settings=spec.train,
        train_proposals=spec.train_proposals,
        test_proposals=spec.test_proposals,
        coder_stds=spec.coder_stds,
        bbox_loss_beta=spec.bbox_loss_beta,
    )


def _roi_head(spec: RoIHeadSpec, inference: InferenceSpec, in_channels: int, num_classes: int) -> HybridTaskCascadeRoIHead:
    stages = spec.stages
    return HybridTaskCascadeRoIHead(
        bbox_heads=[
            Shared2FCBBoxHead(
                num_classes=num_classes,
                in_channels=in_channels,
                roi_size=spec.bbox_roi_size,
                fc_channels=spec.fc_channels,
                target_stds=stage.coder_stds,
            )
            for stage in stages
        ],
        mask_heads=[
            HTCMaskHead(
                num_classes=num_classes,
                in_channels=in_channels,
                conv_out_channels=spec.mask_channels,
                num_convs=spec.mask_num_convs,
                with_conv_res=t > 0,  # mask information flow: every stage but the first reads its predecessor
                group_norm=spec.group_norm,
            )
            for t in range(len(stages))
        ],
        semantic_head=FusedSemanticHead(
            num_classes=spec.semantic_num_classes,
            in_channels=in_channels,
            conv_out_channels=spec.semantic_channels,
            num_convs=spec.semantic_num_convs,
            loss_weight=spec.semantic_loss_weight,
            group_norm=spec.group_norm,
        ),
        assigners=[
            MaxIoUAssigner(pos_iou_thr=s.iou_thr, neg_iou_thr=s.iou_thr, min_pos_iou=s.iou_thr, match_low_quality=s.match_low_quality)
            for s in stages
        ],
        samplers=[RandomSampler(num=s.num_samples, pos_fraction=s.pos_fraction, add_gt_as_proposals=True) for s in stages],
        layout=spec,
        inference=inference,
    )


def build_from_spec(spec: ModelSpec) -> HybridTaskCascade:
    """The detector a spec describes, initialised for training from scratch (spec section 10)."""
    backbone = _resnet(spec.backbone)
    return HybridTaskCascade(
        backbone=backbone,
        neck=_neck(spec.neck, backbone.out_channels),
        rpn_head=build_rpn_head(spec.rpn, spec.neck.out_channels),
        roi_head=_roi_head(spec.roi_head, spec.inference, spec.neck.out_channels, spec.num_classes),
    )
