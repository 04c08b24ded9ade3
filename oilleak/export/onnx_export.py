"""`oilleak export`: an oilleak checkpoint -> one ONNX file holding the whole detector (see ``graph``).

The file's inputs and outputs:
    image   (height, width, 3) uint8 RGB, the photo already resized to fit the preset's scale
            (``postprocess.resize_for_graph``); normalisation and the padding to a multiple of 32 are
            inside the graph, so any height and width go in.
    boxes   (n, 4) float32 x1, y1, x2, y2 in the pixels of ``image``, by decreasing score
    scores  (n,) float32;  labels (n,) int64, 0-based indices into the classes
    masks   (n, 28, 28) float32: each detection's mask probability for its own class, stages merged
The paste into the photo and the outlines are numpy post-processing (``postprocess``, ``onnx_runtime``).

Metadata (``metadata_props``, all strings): ``oilleak.classes`` (JSON list), ``oilleak.preset``,
``oilleak.scale`` (JSON [long, short]), ``oilleak.mean`` / ``oilleak.std`` (JSON, RGB, applied in the
graph), ``oilleak.score_thr`` (the checkpoint's predict threshold), ``oilleak.mask_thr``,
``oilleak.mask_merge``, ``oilleak.version``, ``oilleak.checkpoint_sha256``, ``oilleak.checkpoint``
(the file's name), ``oilleak.input`` (the layout in words), ``oilleak.precision`` (``float32`` or ``float16``).

``--fp16`` (``to_float16``): the same inputs and outputs (uint8 image in, float32 boxes, scores and masks out),
every weight stored in float16 (half the file), and the model's modules computing in float16: backbone, recursive
feature pyramid, RPN head convolutions, semantic head, box heads' fully connected layers, mask heads. In float32
stay the graph's own steps between those modules (``graph.DetectorGraph``: normalisation, anchors, box decoding
and clipping, top-k, NMS, score threshold, RoIAlign and its level choice, softmax, mask sigmoid), where float16's
steps (0.5 px between 512 and 1024, 1 px above) would move boxes and change which detections survive NMS, and
the deformable convolutions (``DeformConv``, their weights cast up in the graph), whose sampling positions are
pixel coordinates too. ONNX Runtime's CPU provider has float16 kernels for few operators and casts around the
others, so on the CPU the file is smaller, not faster; the float16 layers are meant for GPU providers.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from oilleak.errors import OilleakError

DEFAULT_OPSET = 19
OUTPUT_NAMES = ("boxes", "scores", "labels", "masks")
INPUT_LAYOUT = "image: (height, width, 3) uint8 RGB, resized to fit oilleak.scale; normalised and padded to /32 inside"


@dataclass
class ExportReport:
    path: Path
    opset: int
    seconds: float
    size_bytes: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require_onnx(fp16: bool) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  the TorchScript exporter still imports it in torch 2.9+

        if fp16:
            import onnxruntime  # noqa: F401  its float16 converter
    except ImportError as exc:
        raise OilleakError(f"exporting needs the onnx extra ({exc.name} is missing): pip install 'oilleak[onnx]'") from None


def check_opset(opset: int, uses_deform_conv: bool) -> None:
    """A clear error for an opset the graph cannot be written in, naming the operator that needs more."""
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

    from oilleak.export.symbolics import DEFORM_CONV_OPSET, ROI_ALIGN_OPSET

    if opset > ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET:
        raise OilleakError(f"--opset {opset}: this PyTorch writes ONNX up to opset {ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET}; pass --opset {DEFAULT_OPSET}")
    if opset < ROI_ALIGN_OPSET:
        raise OilleakError(
            f"--opset {opset}: RoIAlign with aligned=True (RoiAlign coordinate_transformation_mode='half_pixel') "
            f"needs opset {ROI_ALIGN_OPSET} or later; pass --opset {DEFAULT_OPSET}"
        )
    if uses_deform_conv and opset < DEFORM_CONV_OPSET:
        raise OilleakError(
            f"--opset {opset}: this model's switchable atrous convolutions are deformable convolutions (ONNX DeformConv), "
            f"which need opset {DEFORM_CONV_OPSET} or later; pass --opset {DEFAULT_OPSET}"
        )


def export_checkpoint(
    checkpoint: Path, out: Path, *, opset: int = DEFAULT_OPSET, dynamic: bool = True, fp16: bool = False,
    example_size: tuple[int, int] | None = None, stages: bool = False,
) -> ExportReport:
    """Write ``out`` (never over an existing file). ``dynamic``: any image size (the default; without it the
    graph is fixed to ``example_size``, by default the preset scale's landscape size). ``fp16``: a float16 file
    (``to_float16``). ``stages``: also output every step's result (``graph.DetectorGraph``), for checking an
    export step by step."""
    _require_onnx(fp16)
    import onnx
    import torch

    from oilleak.export.graph import DetectorGraph, stage_output_names
    from oilleak.export.symbolics import register
    from oilleak.models.checkpoint import model_from_checkpoint
    from oilleak.models.sac import SAConv2d

    out = Path(out)
    if out.suffix != ".onnx":
        raise OilleakError(f"{out}: the output file must end in .onnx")
    if out.exists():
        raise OilleakError(f"{out} exists; oilleak does not overwrite files: pass another name or remove it")
    model, config = model_from_checkpoint(checkpoint, "cpu")
    check_opset(opset, any(isinstance(m, SAConv2d) for m in model.modules()))
    register()
    long_side, short_side = max(config.data.scale), min(config.data.scale)
    height, width = example_size or (short_side, long_side)
    example = torch.zeros(height, width, 3, dtype=torch.uint8)
    example[::7, ::5] = 255  # some structure, so the example run has proposals and detections
    output_names = list(OUTPUT_NAMES)
    dynamic_axes = {name: {0: "detections"} for name in OUTPUT_NAMES}
    if stages:
        extra = stage_output_names(model.roi_head.num_stages, len(model.roi_head.layout.featmap_strides) + 1)
        output_names += extra
        dynamic_axes.update({name: {0: "rois"} for name in extra if not name.startswith("p")})
        dynamic_axes.update({name: {2: f"{name}_height", 3: f"{name}_width"} for name in extra if name.startswith("p")})
    if dynamic:
        dynamic_axes["image"] = {0: "height", 1: "width"}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about the constant branches it records
            torch.onnx.export(
                DetectorGraph(model, stages), (example,), tmp, opset_version=opset, dynamo=False, input_names=["image"],
                output_names=output_names, dynamic_axes=dynamic_axes,
            )
        graph = onnx.load(tmp)
        if fp16:
            graph = to_float16(graph)
        _set_metadata(graph, config, checkpoint, model, "float16" if fp16 else "float32")
        onnx.save(graph, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ExportReport(out, opset, time.perf_counter() - start, out.stat().st_size)


def to_float16(model):
    """An exported float32 ``onnx.ModelProto`` -> its float16 version (see the module docstring)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxscript import ir, optimizer

    # ConvAWS and SAC standardise their weights inside the graph: fold that in float32 first, so the file holds
    # the standardised weights rounded once instead of statistics recomputed in float16 at every run
    optimizer.fold_constants(model, input_size_limit=sys.maxsize, output_size_limit=sys.maxsize)
    # the exporter names a module's nodes /module/path/Op; DetectorGraph's own steps have no module path
    own_steps = [node.name for node in model.graph.node if "/" not in node.name[1:]]
    model = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, "DeformConv"], node_block_list=own_steps,
        force_fp16_initializers=True,  # DeformConv's weights too: stored in float16, cast up in the graph
    )
    # The converter casts every float32 node's output to float16 and back to float32 for the next float32 node,
    # which would round boxes between every two steps: those round trips become identities, then are removed.
    graph = model.graph
    float32 = {value.name for value in graph.value_info if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    producers = {name: node for node in graph.node for name in node.output}
    for node in graph.node:
        inner = producers.get(node.input[0]) if _is_cast(node, onnx.TensorProto.FLOAT) else None
        if _is_cast(inner, onnx.TensorProto.FLOAT16) and inner.input[0] in float32:
            node.op_type, node.input[0] = "Identity", inner.input[0]
            del node.attribute[:]
    tidy = ir.from_proto(model)
    # the converter appends its casts at the end; ONNX wants the nodes in order
    for step in (ir.passes.common.IdentityEliminationPass(), ir.passes.common.RemoveUnusedNodesPass(), ir.passes.common.TopologicalSortPass()):
        step(tidy)
    return ir.to_proto(tidy)


def _is_cast(node, to: int) -> bool:
    from onnx.helper import get_node_attr_value

    return node is not None and node.op_type == "Cast" and get_node_attr_value(node, "to") == to


def _set_metadata(graph, config, checkpoint: Path, model, precision: str) -> None:
    import oilleak
    from oilleak.data.transforms import MEAN, STD

    head = model.roi_head
    entries = {
        "oilleak.classes": json.dumps(list(config.data.classes)),
        "oilleak.preset": config.model.preset,
        "oilleak.scale": json.dumps(list(config.data.scale)),
        "oilleak.mean": json.dumps(list(MEAN)),
        "oilleak.std": json.dumps(list(STD)),
        "oilleak.score_thr": str(config.predict.score_thr),
        "oilleak.mask_thr": str(head.inference.mask_thr),
        "oilleak.mask_merge": head.inference.mask_merge,
        "oilleak.version": oilleak.__version__,
        "oilleak.checkpoint": Path(checkpoint).name,
        "oilleak.checkpoint_sha256": file_sha256(Path(checkpoint)),
        "oilleak.input": INPUT_LAYOUT,
        "oilleak.precision": precision,
    }
    del graph.metadata_props[:]
    for key, value in entries.items():
        prop = graph.metadata_props.add()
        prop.key, prop.value = key, value
