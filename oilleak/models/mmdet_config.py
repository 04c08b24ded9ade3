"""mmdetection's ``model=dict(...)`` read into a :class:`~oilleak.models.specs.ModelSpec`.

How the parity fixtures' ``model_config`` (and any mmdet DetectoRS / HTC config) becomes an oilleak model:
every key is read by name and anything oilleak does not implement is refused, naming the key.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from oilleak.errors import OilleakError
from oilleak.models.detector import HybridTaskCascade
from oilleak.models.presets import build_from_spec
from oilleak.models.rpn import ProposalSettings, RPNTrainSettings
from oilleak.models.specs import (
    BackboneSpec,
    CascadeStageSpec,
    InferenceSpec,
    ModelSpec,
    NeckSpec,
    RFPSpec,
    RoIHeadSpec,
    RPNSpec,
)


_MISSING = object()


class _MMDetDict:
    """One mmdet config dict plus where it sits (``model.rpn_head``), so every refusal names the key."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise OilleakError(f"{where} must be a dict in the mmdet model config, got {type(data).__name__}")
        self.data, self.where = data, where

    def __getitem__(self, key: str) -> Any:
        return self.get(key)

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.data:
            value = self.data[key]
            return tuple(value) if isinstance(value, list) else value
        if default is _MISSING:
            raise OilleakError(f"{self.where}.{key} is missing from the mmdet model config; add it")
        return default

    def sub(self, key: str) -> _MMDetDict:
        return _MMDetDict(self.get(key), f"{self.where}.{key}")

    def item(self, key: str, index: int) -> _MMDetDict:
        return _MMDetDict(self.get(key)[index], f"{self.where}.{key}[{index}]")

    def expect(self, key: str, supported: Any, default: Any = _MISSING) -> None:
        """Refuse a value oilleak does not implement (a missing key counts as ``default``)."""
        value = self.get(key, supported if default is _MISSING else default)
        if value != supported:
            raise OilleakError(
                f"{self.where}.{key} = {value!r} is not supported: oilleak implements {supported!r} only; change it or remove it"
            )

    def same(self, key: str, value: Any, default: Any = _MISSING) -> None:
        """Refuse a value that must equal one implied elsewhere (e.g. in_channels vs the neck's width)."""
        if self.get(key, default) != value:
            raise OilleakError(f"{self.where}.{key} = {self.get(key, default)!r} must be {value!r} to fit the rest of the model")


def _backbone_from_mmdet(cfg: _MMDetDict) -> BackboneSpec:
    if cfg["type"] not in ("ResNet", "DetectoRS_ResNet"):
        raise OilleakError(f"{cfg.where}.type = {cfg['type']!r} is not supported; use ResNet or DetectoRS_ResNet")
    cfg.expect("num_stages", 4)
    cfg.expect("out_indices", (0, 1, 2, 3))
    cfg.expect("style", "pytorch")
    cfg.expect("strides", (1, 2, 2, 2))
    cfg.expect("dilations", (1, 1, 1, 1))
    cfg.expect("dcn", None)
    cfg.expect("norm_cfg", {"type": "BN", "requires_grad": True})
    conv_type = (cfg.get("conv_cfg", None) or {}).get("type")
    if conv_type not in (None, "ConvAWS"):
        raise OilleakError(f"{cfg.where}.conv_cfg type {conv_type!r} is not supported; use ConvAWS or no conv_cfg")
    stage_with_sac = tuple(bool(v) for v in cfg.get("stage_with_sac", (False,) * 4))
    if any(stage_with_sac):
        cfg.expect("sac", {"type": "SAC", "use_deform": True})
    return BackboneSpec(
        depth=cfg["depth"],
        base_channels=cfg.get("base_channels", 64),
        use_aws=conv_type == "ConvAWS",
        stage_with_sac=stage_with_sac,  # type: ignore[arg-type]
        frozen_stages=cfg.get("frozen_stages", -1),
        norm_eval=cfg.get("norm_eval", True),
    )


def _neck_from_mmdet(cfg: _MMDetDict, backbone: BackboneSpec) -> NeckSpec:
    if cfg["type"] not in ("FPN", "RFP"):
        raise OilleakError(f"{cfg.where}.type = {cfg['type']!r} is not supported; use FPN or RFP")
    cfg.same("in_channels", tuple(backbone.out_channels))
    cfg.expect("start_level", 0)
    cfg.expect("add_extra_convs", False)
    out_channels = cfg["out_channels"]
    rfp = None
    if cfg["type"] == "RFP":
        second = cfg.sub("rfp_backbone")
        second.same("rfp_inplanes", out_channels)
        rfp = RFPSpec(
            backbone=_backbone_from_mmdet(second),
            steps=cfg["rfp_steps"],
            aspp_out_channels=cfg["aspp_out_channels"],
            aspp_dilations=cfg.get("aspp_dilations", (1, 3, 6, 1)),
        )
    return NeckSpec(out_channels=out_channels, num_outs=cfg.get("num_outs", 5), rfp=rfp)


def _proposals_from_mmdet(cfg: _MMDetDict) -> ProposalSettings:
    nms = cfg.sub("nms")
    nms.expect("type", "nms")
    return ProposalSettings(
        nms_pre=cfg["nms_pre"], max_per_img=cfg["max_per_img"], nms_iou=nms["iou_threshold"], min_bbox_size=cfg.get("min_bbox_size", 0)
    )


def _rpn_from_mmdet(head: _MMDetDict, train: _MMDetDict, test: _MMDetDict, in_channels: int) -> RPNSpec:
    head.expect("type", "RPNHead")
    head.same("in_channels", in_channels)
    head.expect("num_convs", 1)
    anchors = head.sub("anchor_generator")
    anchors.expect("type", "AnchorGenerator")
    anchors.expect("center_offset", 0.0)
    coder = head.sub("bbox_coder")
    coder.expect("type", "DeltaXYWHBBoxCoder")
    coder.expect("target_means", (0.0, 0.0, 0.0, 0.0))
    head.sub("loss_cls").expect("use_sigmoid", True)
    head.sub("loss_cls").expect("loss_weight", 1.0)
    loss_bbox = head.sub("loss_bbox")
    loss_bbox.expect("type", "SmoothL1Loss")
    loss_bbox.expect("loss_weight", 1.0)
    rpn = train.sub("rpn")
    assigner, sampler = rpn.sub("assigner"), rpn.sub("sampler")
    assigner.expect("type", "MaxIoUAssigner")
    assigner.expect("ignore_iof_thr", -1)
    sampler.expect("type", "RandomSampler")
    sampler.expect("neg_pos_ub", -1)
    sampler.expect("add_gt_as_proposals", False)
    return RPNSpec(
        feat_channels=head["feat_channels"],
        strides=anchors["strides"],
        ratios=anchors["ratios"],
        scales=anchors["scales"],
        coder_stds=coder.get("target_stds", (1.0, 1.0, 1.0, 1.0)),
        bbox_loss_beta=loss_bbox.get("beta", 1.0),
        train=RPNTrainSettings(
            pos_iou_thr=assigner["pos_iou_thr"],
            neg_iou_thr=assigner["neg_iou_thr"],
            min_pos_iou=assigner.get("min_pos_iou", 0.0),
            match_low_quality=assigner.get("match_low_quality", True),
            num_samples=sampler["num"],
            pos_fraction=sampler["pos_fraction"],
            allowed_border=rpn.get("allowed_border", 0),
        ),
        train_proposals=_proposals_from_mmdet(train.sub("rpn_proposal")),
        test_proposals=_proposals_from_mmdet(test.sub("rpn")),
    )


def _stage_from_mmdet(head: _MMDetDict, train: _MMDetDict, loss_weight: float) -> CascadeStageSpec:
    assigner, sampler = train.sub("assigner"), train.sub("sampler")
    assigner.expect("type", "MaxIoUAssigner")
    assigner.expect("ignore_iof_thr", -1)
    iou_thr = assigner["pos_iou_thr"]
    assigner.same("neg_iou_thr", iou_thr)
    assigner.same("min_pos_iou", iou_thr)
    sampler.expect("type", "RandomSampler")
    sampler.expect("neg_pos_ub", -1)
    sampler.expect("add_gt_as_proposals", True)
    coder = head.sub("bbox_coder")
    coder.expect("type", "DeltaXYWHBBoxCoder")
    coder.expect("target_means", (0.0, 0.0, 0.0, 0.0))
    return CascadeStageSpec(
        iou_thr=iou_thr,
        coder_stds=coder["target_stds"],
        loss_weight=loss_weight,
        match_low_quality=assigner.get("match_low_quality", True),
        num_samples=sampler["num"],
        pos_fraction=sampler["pos_fraction"],
    )


def _roi_head_from_mmdet(roi: _MMDetDict, train: _MMDetDict, test: _MMDetDict, in_channels: int) -> tuple[RoIHeadSpec, InferenceSpec, int]:
    roi.expect("type", "HybridTaskCascadeRoIHead")
    roi.expect("interleaved", True)
    roi.expect("mask_info_flow", True)
    roi.expect("semantic_fusion", ("bbox", "mask"))
    num_stages = roi["num_stages"]
    box_extractor, mask_extractor = roi.sub("bbox_roi_extractor"), roi.sub("mask_roi_extractor")
    sem_extractor = roi.sub("semantic_roi_extractor")
    for extractor in (box_extractor, mask_extractor, sem_extractor):
        extractor.same("out_channels", in_channels)
        layer = extractor.sub("roi_layer")
        layer.expect("type", "RoIAlign")
        layer.expect("sampling_ratio", 0)
        layer.expect("aligned", True)
    mask_extractor.same("featmap_strides", box_extractor["featmap_strides"])
    mask_extractor.same("finest_scale", box_extractor.get("finest_scale", 56), default=56)
    # the semantic RoI features are added to the mask RoI features, so both have the same size
    sem_extractor.sub("roi_layer").same("output_size", mask_extractor["roi_layer"]["output_size"])

    weights = roi["stage_loss_weights"]
    if len(weights) != num_stages or len(roi["bbox_head"]) != num_stages or len(roi["mask_head"]) != num_stages:
        raise OilleakError(f"{roi.where}: stage_loss_weights, bbox_head and mask_head need num_stages ({num_stages}) entries each")
    first_box, first_mask = roi.item("bbox_head", 0), roi.item("mask_head", 0)
    num_classes = first_box["num_classes"]
    for t in range(num_stages):
        box, mask = roi.item("bbox_head", t), roi.item("mask_head", t)
        box.expect("type", "Shared2FCBBoxHead")
        box.expect("reg_class_agnostic", True)
        box.same("in_channels", in_channels)
        box.same("num_classes", num_classes)
        box.same("fc_out_channels", first_box.get("fc_out_channels", 1024), default=1024)
        box.same("roi_feat_size", box_extractor["roi_layer"]["output_size"], default=7)
        box.sub("loss_bbox").expect("beta", 1.0)
        mask.expect("type", "HTCMaskHead")
        mask.same("in_channels", in_channels)
        mask.same("num_classes", num_classes)
        mask.same("conv_out_channels", first_mask.get("conv_out_channels", 256), default=256)
        mask.same("num_convs", first_mask.get("num_convs", 4), default=4)
        mask.expect("with_conv_res", t > 0, default=True)
    semantic = roi.sub("semantic_head")
    semantic.expect("type", "FusedSemanticHead")
    semantic.same("in_channels", in_channels)
    semantic.expect("num_ins", 5)
    semantic.expect("fusion_level", 1)
    semantic.expect("seg_scale_factor", 1 / 8)
    semantic.sub("loss_seg").expect("ignore_index", 255)
    sem_extractor.same("featmap_strides", (box_extractor["featmap_strides"][semantic["fusion_level"]],))

    stages = tuple(_stage_from_mmdet(roi.item("bbox_head", t), train.item("rcnn", t), weights[t]) for t in range(num_stages))
    spec = RoIHeadSpec(
        stages=stages,
        fc_channels=first_box.get("fc_out_channels", 1024),
        mask_channels=first_mask.get("conv_out_channels", 256),
        mask_num_convs=first_mask.get("num_convs", 4),
        semantic_channels=semantic.get("conv_out_channels", 256),
        semantic_num_convs=semantic.get("num_convs", 4),
        semantic_num_classes=semantic["num_classes"],
        semantic_loss_weight=semantic.sub("loss_seg").get("loss_weight", 1.0),
        featmap_strides=box_extractor["featmap_strides"],
        semantic_stride=sem_extractor["featmap_strides"][0],
        finest_scale=box_extractor.get("finest_scale", 56),
        bbox_roi_size=box_extractor["roi_layer"]["output_size"],
        mask_roi_size=mask_extractor["roi_layer"]["output_size"],
    )
    rcnn = test.sub("rcnn")
    rcnn.sub("nms").expect("type", "nms")
    inference_spec = InferenceSpec(
        score_thr=rcnn["score_thr"],
        nms_iou=rcnn["nms"]["iou_threshold"],
        max_per_img=rcnn["max_per_img"],
        mask_thr=rcnn["mask_thr_binary"],
        mask_merge="last",  # what mmdet 3.3 does
    )
    return spec, inference_spec, num_classes


def spec_from_mmdet(model_dict: dict[str, Any]) -> ModelSpec:
    """Read an mmdet ``model=dict(...)`` of a (DetectoRS) HTC into a ModelSpec; refuse what oilleak lacks."""
    model = _MMDetDict(model_dict, "model")
    model.expect("type", "HybridTaskCascade")
    backbone = _backbone_from_mmdet(model.sub("backbone"))
    neck = _neck_from_mmdet(model.sub("neck"), backbone)
    if (neck.rfp is None) == (model["backbone"].get("output_img", False) is True):
        raise OilleakError("model.backbone.output_img must be True exactly when model.neck is an RFP (it feeds the image to the second backbone)")
    train, test = model.sub("train_cfg"), model.sub("test_cfg")
    rpn = _rpn_from_mmdet(model.sub("rpn_head"), train, test, neck.out_channels)
    roi_head, inference_spec, num_classes = _roi_head_from_mmdet(model.sub("roi_head"), train, test, neck.out_channels)
    return ModelSpec(num_classes=num_classes, backbone=backbone, neck=neck, rpn=rpn, roi_head=roi_head, inference=inference_spec)


def model_from_mmdet_config(model_dict: dict[str, Any], *, mask_merge: Literal["mean", "last"] = "last") -> HybridTaskCascade:
    """Build from an mmdet ``model=dict(...)`` (plain dicts and lists). ``mask_merge`` defaults to mmdet 3.3's
    'last'. To train with other sampler settings, e.g. a parity fixture's deterministic ones, pass
    ``{**model_dict, "train_cfg": loss_train_cfg}``."""
    spec = spec_from_mmdet(model_dict)
    return build_from_spec(replace(spec, inference=replace(spec.inference, mask_merge=mask_merge)))
