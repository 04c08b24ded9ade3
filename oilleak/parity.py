"""``oilleak parity FIXTURE.pt``: check oilleak against mmdetection 3.3 stage by stage.

A fixture (made by ``../shared/peers/mmdet/make_parity_fixture.py``) holds an mmdet model config, random
weights, one input image and everything mmdet computed from it. oilleak builds the model from the config,
loads the weights through the checkpoint loader and compares:

- each stage on mmdet's own input for it, so one stage's error can neither hide nor blame another:
  every ResNet stage, the ASPP and the neck on mmdet's C2..C5; the RPN and the semantic head on mmdet's
  pyramid; proposals from mmdet's RPN outputs; every box stage on mmdet's proposals; every mask stage on
  mmdet's detections;
- end to end through ``model(...)``: the backbone and neck outputs on the way, the detections and masks in
  original pixels (predict mode) and every loss (loss mode, with the fixture's deterministic samplers).

A fixture runs in the dtype mmdet computed it in (``made_with.compute_dtype``, float32 when absent): the
model, the input and torchvision's ops in float64 for a float64 fixture; masks are pasted in float32 either
way, as mmdet does.

Tolerances (``TOLERANCES``, by the fixture's dtype), in float32: features and raw head outputs
max |diff| / max |reference| <= 1e-4; proposals and detections matched one to one (same label, box IoU >=
0.999, |score diff| <= 1e-4), >= 99% of them; matched masks IoU >= 0.99 (pycocotools, on the fixture's RLEs);
every loss within 1e-4 relative. In float64 each is ten times the worst difference measured on the float64
fixtures, all proposals and detections matched and every mask identical.

Float32 end-to-end results depend on the CPU (its instruction set picks oneDNN's kernels) and the number of
threads, because a random-weight DetectoRS amplifies rounding about 30-fold per SAC stage (measured: the
float32 DetectoRS fixture made on one x86 CPU is 1.4e-4 off at C4 and matches 0/100 detections on another,
though every stage on mmdet's input is within 1e-5). The float64 fixtures do not move, so only they can
prove end-to-end parity on any machine; the float32 fixtures prove each stage. On CUDA (``device``) TF32 is
switched off for the run: its 10-bit mantissa is far outside these tolerances.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from oilleak.errors import OilleakError
from oilleak.models.box_ops import box_iou
from oilleak.models.checkpoint import load_weights, read_torch_file
from oilleak.models.deform_conv import reference_kernel
from oilleak.models.detector import HybridTaskCascade
from oilleak.models.mmdet_config import model_from_mmdet_config
from oilleak.models.rfp import RFP
from oilleak.structures import ImageMeta, Targets

FIXTURE_FORMAT = "oilleak-mmdet-parity/1"
FIXTURE_THREADS = 2  # the fixtures were made on a 2-core machine
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class Tolerances:
    feature: float  # features and raw head outputs: max |diff| / max |reference|
    loss: float  # each loss: |diff| / |reference|
    min_matched: float  # share of the proposals / detections matched one to one
    box_iou: float  # a match's box IoU is at least this
    # Final boxes are never size-filtered, so zero-width boxes (clipped at the image edge) occur; their IoU
    # is meaningless (box_iou gives 0): such boxes match when every coordinate agrees within this many pixels.
    box_px: float
    score: float  # a match's |score diff|
    mask_iou: float  # every matched mask's IoU is at least this


TOLERANCES = {
    # what a correct re-implementation reaches in float32 on CPU (../shared/fixtures/mmdet/README.md)
    torch.float32: Tolerances(feature=1e-4, loss=1e-4, min_matched=0.99, box_iou=0.999, box_px=1e-3, score=1e-4,
                              mask_iou=0.99),
    # Ten times the worst difference measured on htc_small_f64.pt and detectors_htc_small_f64.pt at 1 and at 2
    # threads (`oilleak parity FIXTURE --threads N`, the largest of each quantity over the rows; 2-core Xeon,
    # torch 2.14.1, 2026-12-08). The references are float64 results stored rounded to float32, so these
    # differences are that rounding (and its effect on the stage inputs), not the CPU. Measured worst:
    # features 1.68e-6 (box head on mmdet's proposals), losses 5.0e-8, scores 5.2e-7, 1 - box IoU 5.8e-5,
    # box corners 6.5e-5 px, every mask identical (IoU 1: nothing to multiply, so identical it stays).
    torch.float64: Tolerances(feature=1.7e-5, loss=5e-7, min_matched=1.0, box_iou=1 - 5.8e-4, box_px=6.5e-4,
                              score=5.2e-6, mask_iou=1.0),
}
F32 = TOLERANCES[torch.float32]

# report sections
STAGES = "each stage on mmdet's input"
END_TO_END = "end to end: model(images)"
END_TO_END_LOSSES = "end to end: losses"

REQUIRED_KEYS = (
    "model_config",
    "state_dict",
    "loss_train_cfg",
    "losses",
    "inputs.batch_inputs",
    "inputs.img_meta",
    "outputs.backbone",
    "outputs.neck",
    "outputs.rpn_cls",
    "outputs.rpn_reg",
    "outputs.proposals",
    "outputs.semantic_pred",
    "outputs.semantic_feat",
    "outputs.stage_cls",
    "outputs.stage_reg",
    "outputs.mask_logits",
    "outputs.dets",
    "outputs.dets_input_scale",
    "loss_inputs.gt_bboxes",
    "loss_inputs.gt_labels",
    "loss_inputs.gt_masks",
    "loss_inputs.gt_sem_seg_padded",
)


@dataclass
class Check:
    """One row of the report. ``max_abs`` / ``relative`` are None where a count or IoU says more."""

    section: str
    name: str
    passed: bool
    detail: str = ""
    max_abs: float | None = None
    relative: float | None = None


@dataclass
class ParityReport:
    fixture: str
    variant: str
    checks: list[Check]
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


# ------------------------------------------------------------------------------------------------ input


def read_fixture(path: str | Path) -> dict[str, Any]:
    fixture = read_torch_file(path, "parity fixture", "a .pt file such as ../shared/fixtures/mmdet/htc_small.pt")
    check_fixture(fixture, str(path))
    return fixture


def check_fixture(fixture: Any, name: str) -> None:
    if not isinstance(fixture, dict) or fixture.get("format") != FIXTURE_FORMAT:
        found = fixture.get("format") if isinstance(fixture, dict) else type(fixture).__name__
        raise OilleakError(
            f"{name} is not a parity fixture: 'format' is {found!r}, expected {FIXTURE_FORMAT!r}. "
            "Make one with ../shared/peers/mmdet/make_parity_fixture.py"
        )
    missing = [key for key in REQUIRED_KEYS if _lookup(fixture, key) is None]
    if missing:
        raise OilleakError(f"parity fixture {name} lacks {', '.join(repr(k) for k in missing)}; remake it with make_parity_fixture.py")


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def fixture_dtype(fixture: dict[str, Any], name: str = "the fixture") -> torch.dtype:
    """The dtype mmdet computed the fixture in; float32 for fixtures made before ``compute_dtype`` existed."""
    made_with = fixture.get("made_with")
    found = made_with.get("compute_dtype", "float32") if isinstance(made_with, dict) else "float32"
    if found not in COMPUTE_DTYPES:
        raise OilleakError(f"parity fixture {name}: made_with.compute_dtype is {found!r}; oilleak runs {' or '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[found]


def fixture_meta(fixture: dict[str, Any]) -> ImageMeta:
    meta = fixture["inputs"]["img_meta"]
    return ImageMeta(
        image_id=int(meta.get("img_id", 0)),
        file_name=str(fixture["inputs"].get("image_file", "")),
        ori_shape=tuple(meta["ori_shape"][:2]),
        img_shape=tuple(meta["img_shape"][:2]),
        pad_shape=tuple(meta["pad_shape"][:2]),
        scale_factor=tuple(meta["scale_factor"][:2]),
    )


def fixture_targets(fixture: dict[str, Any], dtype: torch.dtype = torch.float32) -> Targets:
    gt = fixture["loss_inputs"]
    return Targets(
        boxes=gt["gt_bboxes"].to(dtype),
        labels=gt["gt_labels"].long(),
        masks=gt["gt_masks"].bool(),
        sem_seg=gt["gt_sem_seg_padded"].reshape(gt["gt_sem_seg_padded"].shape[-2:]).to(torch.uint8),
    )


def fixture_model(fixture: dict[str, Any]) -> tuple[HybridTaskCascade, Check]:
    """The fixture's model (mmdet 3.3's last-stage masks, the fixture's deterministic samplers) with its
    weights loaded through the checkpoint loader, and a check that every tensor found its place."""
    model = model_from_mmdet_config({**fixture["model_config"], "train_cfg": fixture["loss_train_cfg"]}, mask_merge="last")
    report = load_weights(model, fixture["state_dict"])
    problems = len(report.skipped) + len(report.missing) + len(report.unexpected) + len(report.derived)
    detail = f"{len(report.loaded)} tensors loaded" if not problems else report.format(max_lines=5)
    return model, Check("weights", "state dict", problems == 0, detail)


# ------------------------------------------------------------------------------------------------ comparisons


def compare_tensors(section: str, name: str, ours: Tensor, ref: Tensor, tol: float = F32.feature) -> Check:
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    if ours.shape != ref.shape:
        return Check(section, name, False, f"shape {'x'.join(map(str, ours.shape))} vs mmdet {'x'.join(map(str, ref.shape))}")
    if ref.numel() == 0:
        return Check(section, name, True, "empty", 0.0, 0.0)
    max_abs = float((ours - ref).abs().max())
    scale = float(ref.abs().max())
    relative = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return Check(section, name, relative <= tol, "x".join(map(str, ref.shape)), max_abs, relative)


def compare_lists(section: str, name: str, ours: Sequence[Tensor], refs: Sequence[Tensor], labels: Sequence[str],
                  tol: Tolerances = F32) -> list[Check]:
    if len(ours) != len(refs):
        return [Check(section, name, False, f"{len(ours)} tensors vs mmdet {len(refs)}")]
    return [compare_tensors(section, f"{name} {label}", a, b, tol.feature) for a, b, label in zip(ours, refs, labels)]


def _box_iou(ref_boxes: Tensor, boxes: Tensor) -> Tensor:
    """IoU in float64 (the float32 one would add its own rounding), 0 not NaN for zero-area boxes."""
    return box_iou(ref_boxes.double(), boxes.double())


def match_detections(
    boxes: Tensor, scores: Tensor, labels: Tensor, ref_boxes: Tensor, ref_scores: Tensor, ref_labels: Tensor,
    tol: Tolerances = F32,
) -> list[tuple[int, int]]:
    """One-to-one (ours, reference) pairs: same label, box IoU >= ``tol.box_iou`` (or, for degenerate boxes,
    every coordinate within ``tol.box_px``), |score diff| <= ``tol.score``; each reference, best score first,
    takes the unmatched candidate it overlaps most."""
    if len(boxes) == 0 or len(ref_boxes) == 0:
        return []
    iou = _box_iou(ref_boxes, boxes)
    same_corners = (ref_boxes.double()[:, None, :] - boxes.double()[None, :, :]).abs().amax(dim=2) <= tol.box_px
    iou = torch.where(same_corners, torch.ones_like(iou), iou)
    score_diff = (ref_scores.double()[:, None] - scores.double()[None, :]).abs()
    ok = (iou >= tol.box_iou) & (score_diff <= tol.score) & (ref_labels[:, None] == labels[None, :])
    taken = torch.zeros(len(boxes), dtype=torch.bool)
    pairs = []
    for r in torch.argsort(ref_scores, descending=True, stable=True).tolist():
        candidates = torch.nonzero(ok[r] & ~taken).flatten()
        if len(candidates):
            best = int(candidates[iou[r, candidates].argmax()])
            taken[best] = True
            pairs.append((best, r))
    return pairs


def compare_detections(
    section: str,
    name: str,
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor | None,
    ref: dict[str, Tensor],
    tol: Tolerances = F32,
) -> tuple[Check, list[tuple[int, int]]]:
    """Detections (or proposals: ``labels`` None) against mmdet's ``bboxes`` / ``scores`` / ``labels``;
    the row passes when at least ``tol.min_matched`` of the larger set are matched. Its detail shows the
    worst score difference and box IoU of the matches (zero-area boxes left out of the IoU)."""
    boxes, scores = boxes.cpu(), scores.cpu()
    labels = torch.zeros(len(boxes), dtype=torch.long) if labels is None else labels.cpu()
    ref = {key: value.cpu() for key, value in ref.items() if isinstance(value, Tensor)}
    ref_labels = ref.get("labels", torch.zeros(len(ref["bboxes"]), dtype=torch.long))
    pairs = match_detections(boxes, scores, labels, ref["bboxes"], ref["scores"], ref_labels, tol)
    total = max(len(boxes), len(ref["bboxes"]))
    fraction = len(pairs) / total if total else 1.0
    detail = f"{len(pairs)}/{total} matched (ours {len(boxes)}, mmdet {len(ref['bboxes'])})"
    if pairs:
        ours_index, ref_index = (list(side) for side in zip(*pairs))
        score_diff = float((scores[ours_index].double() - ref["scores"][ref_index].double()).abs().max())
        sized = (ref["bboxes"][ref_index, 2:] > ref["bboxes"][ref_index, :2]).all(dim=1)
        ious = _box_iou(ref["bboxes"][ref_index], boxes[ours_index]).diagonal()[sized]
        detail += f", worst score diff {score_diff:.2e}" + (f", worst box IoU 1 - {1 - float(ious.min()):.2e}" if len(ious) else "")
    max_abs = max((float((boxes[a].double() - ref["bboxes"][b].double()).abs().max()) for a, b in pairs), default=0.0)
    return Check(section, name, fraction >= tol.min_matched, detail, max_abs), pairs


def compare_masks(section: str, masks: Tensor, ref_rles: Sequence[dict[str, Any]], pairs: list[tuple[int, int]],
                  tol: Tolerances = F32) -> Check:
    """Mask IoU of every matched detection, by pycocotools on mmdet's RLEs; the row shows the worst."""
    if not pairs:
        nothing_to_compare = len(masks) == 0 and len(ref_rles) == 0
        return Check(section, "masks", nothing_to_compare, "no detections on either side" if nothing_to_compare else "no matched detections to compare")
    ious = []
    for ours_index, ref_index in pairs:
        ref_rle = dict(ref_rles[ref_index])
        ref_rle["counts"] = ref_rle["counts"].encode("ascii") if isinstance(ref_rle["counts"], str) else ref_rle["counts"]
        mask = masks[ours_index].cpu().numpy().astype(np.uint8)
        if list(mask.shape) != list(ref_rle["size"]):
            return Check(section, "masks", False, f"mask size {mask.shape} vs mmdet {tuple(ref_rle['size'])}")
        ours_rle = mask_utils.encode(np.asfortranarray(mask))
        both_empty = mask_utils.area(ours_rle) == 0 and mask_utils.area(ref_rle) == 0
        ious.append(1.0 if both_empty else float(mask_utils.iou([ours_rle], [ref_rle], [0])[0, 0]))
    worst = min(ious)
    below = sum(iou < tol.mask_iou for iou in ious)
    detail = f"{len(ious)} matched masks, worst IoU {worst:.5f}, mean {sum(ious) / len(ious):.5f}" + (f", {below} below {tol.mask_iou}" if below else "")
    return Check(section, "masks", below == 0, detail)


def compare_losses(section: str, ours: dict[str, Tensor], refs: dict[str, Any], tol: Tolerances = F32) -> list[Check]:
    checks = []
    for key, ref_value in refs.items():
        ref = float(sum(ref_value)) if isinstance(ref_value, (list, tuple)) else float(ref_value)  # RPN: per level
        if key not in ours:
            checks.append(Check(section, key, False, "oilleak does not report it"))
            continue
        value = float(ours[key])
        diff = abs(value - ref)
        relative = diff / abs(ref) if ref != 0 else (0.0 if diff == 0 else float("inf"))
        checks.append(Check(section, key, relative <= tol.loss, f"{value:.6g} vs mmdet {ref:.6g}", diff, relative))
    checks += [Check(section, key, False, "mmdet does not report it") for key in ours if key not in refs]
    return checks


# ------------------------------------------------------------------------------------------------ the run


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """No TF32 in convolutions and matrix products on CUDA while inside."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def to_device(tree: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """The fixture's tensors (in dicts, lists and tuples) on ``device``, floating ones in ``dtype``;
    everything else as it is."""
    if isinstance(tree, Tensor):
        return tree.to(device, dtype) if tree.is_floating_point() else tree.to(device)
    if isinstance(tree, dict):
        return {key: to_device(value, device, dtype) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_device(value, device, dtype) for value in tree)
    return tree


def run_parity(
    path: str | Path, *, threads: int | None = FIXTURE_THREADS, device: str | torch.device = "cpu", end_to_end: bool = True
) -> ParityReport:
    """Compare oilleak with the fixture at ``path``, run on ``device``; bad input raises OilleakError.
    ``end_to_end=False`` runs only the weights and the stage rows."""
    fixture = read_fixture(path)
    device = torch.device(device)
    dtype = fixture_dtype(fixture, str(path))
    with intra_op_threads(threads), full_float32(device), torch.no_grad():
        checks = compare_with_fixture(fixture, device, end_to_end=end_to_end)
    variant = str(fixture.get("made_with", {}).get("variant", "?"))
    return ParityReport(fixture=str(path), variant=variant, checks=checks, device=str(device), dtype=str(dtype).removeprefix("torch."))


def compare_with_fixture(fixture: dict[str, Any], device: torch.device = torch.device("cpu"), end_to_end: bool = True) -> list[Check]:
    """Every check, with the model and the fixture's floating tensors in the fixture's compute dtype.
    The weights load in float32 (as stored; float32 values are exact in float64) and are then cast."""
    dtype = fixture_dtype(fixture)
    model, weights = fixture_model(fixture)
    model.to(device, dtype)
    fixture = to_device({key: value for key, value in fixture.items() if key != "state_dict"}, device, dtype)
    images = fixture["inputs"]["batch_inputs"]
    metas = [fixture_meta(fixture)]
    model.eval()
    tol = TOLERANCES[dtype]
    checks = [weights, *_trunk_stages(model, fixture, images, tol), *_head_stages(model, fixture, metas, tol)]
    if not end_to_end:
        return checks
    # In float32, end to end follows the order of every sum: run mmcv's deformable convolution (torchvision's
    # equals it bit for bit), not the vectorised CPU kernel that sums in another order. In float64 the default
    # kernels run: rounding is invisible there, so the fixture checks the path users run.
    with reference_kernel() if dtype == torch.float32 else nullcontext():
        checks += _end_to_end_predict(model, fixture, images, metas, tol)
        model.train()
        losses = model(images, metas, [fixture_targets(fixture, dtype)])
    return checks + compare_losses(END_TO_END_LOSSES, losses, fixture["losses"], tol)


def _trunk_stages(model: HybridTaskCascade, fixture: dict[str, Any], images: Tensor, tol: Tolerances) -> list[Check]:
    """Every ResNet stage on mmdet's output of the stage before (the stem on the image), the ASPP and the
    neck on mmdet's C2..C5."""
    out = fixture["outputs"]
    ref_feats = list(out["backbone"])
    backbone = model.backbone
    inputs = [backbone.stem(images), *ref_feats[:-1]]
    feats = [stage(x) for stage, x in zip(backbone.stages(), inputs)]
    checks = compare_lists(STAGES, "backbone", feats, ref_feats, ["C2", "C3", "C4", "C5"], tol)
    if isinstance(model.neck, RFP):
        if "rfp_aspp" not in out:
            checks.append(Check(STAGES, "ASPP", False, "the fixture has no outputs.rfp_aspp for its RFP neck"))
        else:
            # mmdet also runs the ASPP on P6 (its result is unused): compare all four
            aspp = [model.neck.rfp_aspp(p) for p in model.neck.pyramid(ref_feats)[1:]]
            checks += compare_lists(STAGES, "ASPP", aspp, out["rfp_aspp"], ["P3", "P4", "P5", "P6"], tol)
    pyramid = model.neck(ref_feats, image=images)
    return checks + compare_lists(STAGES, "neck", pyramid, out["neck"], [f"P{i + 2}" for i in range(len(pyramid))], tol)


def _head_stages(model: HybridTaskCascade, fixture: dict[str, Any], metas: list[ImageMeta], tol: Tolerances) -> list[Check]:
    """Each head on mmdet's own input for it: RPN and semantic head on mmdet's pyramid, proposals from
    mmdet's RPN outputs, box heads on mmdet's proposals, mask heads on mmdet's detections."""
    out = fixture["outputs"]
    neck = list(out["neck"])
    levels = [f"P{i + 2}" for i in range(len(neck))]
    cls, reg = model.rpn_head(neck)
    checks = compare_lists(STAGES, "rpn_cls", cls, out["rpn_cls"], levels, tol)
    checks += compare_lists(STAGES, "rpn_reg", reg, out["rpn_reg"], levels, tol)
    (proposals,) = model.rpn_head.proposals(list(out["rpn_cls"]), list(out["rpn_reg"]), metas, training=False)
    ref_proposals = {"bboxes": out["proposals"][:, :4], "scores": out["proposals"][:, 4]}
    checks.append(compare_detections(STAGES, "proposals", proposals[:, :4], proposals[:, 4], None, ref_proposals, tol)[0])

    roi_head = model.roi_head
    semantic_pred, semantic_feat = roi_head.semantic_head(neck)
    checks.append(compare_tensors(STAGES, "semantic pred", semantic_pred, out["semantic_pred"], tol.feature))
    checks.append(compare_tensors(STAGES, "semantic feat", semantic_feat, out["semantic_feat"], tol.feature))
    cascade = roi_head.box_cascade(neck, out["semantic_feat"], [out["proposals"][:, :4]], metas)
    stages = [f"stage {t}" for t in range(len(cascade.cls))]
    checks += compare_lists(STAGES, "box cls", cascade.cls, out["stage_cls"], stages, tol)
    checks += compare_lists(STAGES, "box reg", cascade.reg, out["stage_reg"], stages, tol)
    (dets,) = roi_head.detect(cascade, metas)
    checks.append(
        compare_detections(STAGES, "detections (input pixels)", dets.boxes, dets.scores, dets.labels, out["dets_input_scale"], tol)[0]
    )
    mask_logits = roi_head.mask_cascade(neck, out["semantic_feat"], [out["dets_input_scale"]["bboxes"]])
    return checks + compare_lists(STAGES, "mask logits", mask_logits, out["mask_logits"], stages, tol)


def _end_to_end_predict(
    model: HybridTaskCascade, fixture: dict[str, Any], images: Tensor, metas: list[ImageMeta], tol: Tolerances
) -> list[Check]:
    """``model(images)`` (the caller has put it in eval mode), watching the backbone and neck outputs on the way."""
    out = fixture["outputs"]
    seen: dict[str, list[Tensor]] = {}

    def keep(name: str):
        def hook(_module, _inputs, outputs: list[Tensor]) -> None:
            # a copy: the detector's neck empties the backbone's list once it has used it
            seen.setdefault(name, list(outputs))

        return hook

    hooks = [model.backbone.register_forward_hook(keep("backbone")), model.neck.register_forward_hook(keep("neck"))]
    try:
        (detections,) = model(images, metas)
    finally:
        for hook in hooks:
            hook.remove()
    checks = compare_lists(END_TO_END, "backbone", seen["backbone"], out["backbone"], ["C2", "C3", "C4", "C5"], tol)
    checks += compare_lists(END_TO_END, "neck", seen["neck"], out["neck"], [f"P{i + 2}" for i in range(len(seen["neck"]))], tol)
    boxes, pairs = compare_detections(END_TO_END, "detections", detections.boxes, detections.scores, detections.labels, out["dets"], tol)
    return checks + [boxes, compare_masks(END_TO_END, detections.masks, out["dets"]["masks_rle"], pairs, tol)]


# ------------------------------------------------------------------------------------------------ output


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2e}"


def print_report(report: ParityReport, console: Console) -> None:
    console.print(f"[bold]oilleak vs mmdet 3.3[/] on {report.fixture} ({report.variant}, {report.dtype})", highlight=False)
    sections: dict[str, list[Check]] = {}
    for check in report.checks:
        sections.setdefault(check.section, []).append(check)
    for section, checks in sections.items():
        table = Table(title=section, title_justify="left")
        table.add_column("check")
        table.add_column("max abs diff", justify="right")
        table.add_column("relative", justify="right")
        table.add_column("result")
        table.add_column("detail", overflow="fold")
        for check in checks:
            verdict = "[green]PASS[/]" if check.passed else "[bold red]FAIL[/]"
            table.add_row(check.name, _number(check.max_abs), _number(check.relative), verdict, check.detail)
        console.print(table)
    if report.passed:
        console.print(f"[green]all {len(report.checks)} checks pass[/]")
    else:
        names = ", ".join(f"{c.section}: {c.name}" for c in report.failures()[:8])
        console.print(f"[bold red]{len(report.failures())} of {len(report.checks)} checks fail[/]: {names}", highlight=False)
        explanation = explain_failures(report)
        if explanation:
            console.print(explanation, highlight=False)


def explain_failures(report: ParityReport) -> str:
    """What the failing rows say when every stage matches on mmdet's own input ("" when a stage fails:
    its row names the culprit)."""
    failing = {c.section for c in report.failures()}
    if failing - {END_TO_END, END_TO_END_LOSSES}:
        return ""
    if END_TO_END not in failing:
        return (
            "Every forward output matches mmdet's, end to end too, so rounding cannot explain the failing losses: "
            "the loss computation differs from mmdet's (targets, sampling, loss weights or the reduction)."
        )
    if report.dtype != "float32":
        return (
            f"Every stage matches on mmdet's own input, but this {report.dtype} fixture does not depend on the CPU "
            "or the thread count, so the end-to-end difference is real: look at how the stages are chained (the "
            "RFP's second pass and fusion, the cascade's refined boxes, the rescaling to the original image)."
        )
    where = (
        f"{report.device} sums float32 in another order than the CPU the fixtures were made on"
        if report.device != "cpu"
        else f"the fixture was made with {FIXTURE_THREADS} threads on another x86 CPU; another CPU (its instruction set "
        "picks oneDNN's kernels) or thread count sums in another order"
    )
    return (
        "Every stage matches on mmdet's own input, so the end-to-end differences are float32 rounding amplified "
        f"through the random-weight network: {where}. For end-to-end parity on any machine run the float64 "
        "fixture of the same model (made with --double, e.g. ../shared/fixtures/mmdet/detectors_htc_small_f64.pt)."
    )
