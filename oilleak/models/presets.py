"""Model specs: every hyper-parameter of the detector as frozen dataclasses (spec section 1), the four named
presets, and one builder that turns a spec into modules by calling their constructors.

Two ways in, one way to build:
- ``build_model(config.model, num_classes)``: a preset by name (``detectors_htc_r50``, ``htc_r50`` and their
  ``_tiny`` versions), with the test settings of ``config.model``;
- ``model_from_mmdet_config(model_dict)``: an mmdet ``model=dict(...)`` (such as a parity fixture's
  ``model_config``) read into a ``ModelSpec``; anything oilleak does not implement is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from oilleak.config import ModelConfig
from oilleak.errors import OilleakError
from oilleak.models.bbox_head import Shared2FCBBoxHead
from oilleak.models.box_ops import MaxIoUAssigner, RandomSampler
from oilleak.models.detector import HybridTaskCascade
from oilleak.models.fpn import FPN
from oilleak.models.htc import HybridTaskCascadeRoIHead
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


def preset_spec(model_cfg: ModelConfig, num_classes: int) -> ModelSpec:
    """The named preset with the test settings of ``model_cfg``."""
    spec = PRESETS[model_cfg.preset](num_classes)
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
            )
            for t in range(len(stages))
        ],
        semantic_head=FusedSemanticHead(
            num_classes=spec.semantic_num_classes,
            in_channels=in_channels,
            conv_out_channels=spec.semantic_channels,
            num_convs=spec.semantic_num_convs,
            loss_weight=spec.semantic_loss_weight,
        ),
        assigners=[
            MaxIoUAssigner(pos_iou_thr=s.iou_thr, neg_iou_thr=s.iou_thr, min_pos_iou=s.iou_thr, match_low_quality=s.match_low_quality)
            for s in stages
        ],
        samplers=[RandomSampler(num=s.num_samples, pos_fraction=s.pos_fraction, add_gt_as_proposals=True) for s in stages],
        stage_loss_weights=[s.loss_weight for s in stages],
        featmap_strides=spec.featmap_strides,
        semantic_stride=spec.semantic_stride,
        finest_scale=spec.finest_scale,
        bbox_roi_size=spec.bbox_roi_size,
        mask_roi_size=spec.mask_roi_size,
        score_thr=inference.score_thr,
        nms_iou=inference.nms_iou,
        max_per_img=inference.max_per_img,
        mask_thr=inference.mask_thr,
        mask_merge=inference.mask_merge,
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


# ------------------------------------------------------------------------------------------------ mmdet

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
