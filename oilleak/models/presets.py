"""The four named presets of the detector's spec (``oilleak.models.specs``) and one builder that turns a spec
into modules by calling their constructors.

Two ways in, one way to build:
- ``build_model(config.model, num_classes)``: a preset by name (``detectors_htc_r50``, ``htc_r50`` and their
  ``_tiny`` versions), with the test settings of ``config.model``;
- ``oilleak.models.mmdet_config.model_from_mmdet_config(model_dict)``: an mmdet ``model=dict(...)`` (such as
  a parity fixture's ``model_config``) read into a ``ModelSpec``; anything oilleak does not implement is
  refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

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
from oilleak.models.rpn import AnchorGenerator, RPNHead
from oilleak.models.semantic_head import FusedSemanticHead
from oilleak.models.specs import (
    BackboneSpec,
    InferenceSpec,
    ModelSpec,
    NeckSpec,
    RoIHeadSpec,
    RPNSpec,
)


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
