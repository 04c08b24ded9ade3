"""mmdetection 3.3's own tools on the result pickle `oilleak test --out FILE.pkl` writes.

    /tmp/mmdet_peer/bin/python bench/mmdet_tools_check.py TEST.pkl VAL.json METRICS.json [--work-dir DIR]

Run it with the python of an mmdetection 3.3 install (mmengine 0.10, mmcv 2.1; not oilleak's venv, which
lacks them). It writes a minimal mmdetection config (``CocoDataset`` on VAL.json, test mode, the classes of
oilleak's METRICS.json in its label order; ``CocoMetric`` bbox + segm as ``val_evaluator``) and runs, as
subprocesses, mmdetection's ``tools/analysis_tools/eval_metric.py CONFIG TEST.pkl`` and
``confusion_matrix.py CONFIG TEST.pkl DIR``. Passes when eval_metric's ``coco/bbox_mAP`` and ``coco/segm_mAP``
equal METRICS.json's ``bbox_mAP`` and ``segm_mAP`` to 1e-3 (CocoMetric rounds to 3 decimals),
confusion_matrix.py writes its png and the pickle lists the images in mmdetection's dataset order. With
``--scale LONG SHORT`` (the test's data.scale) it also puts oilleak's predictions through mmdetection's own test
pipeline, DetDataPreprocessor and ``DumpDetResults`` and requires that pickle to equal oilleak's: the same keys,
types, dtypes and values (meta, tensors, RLE bytes). Prints the commands and a Markdown table; exit status 1
when a check fails.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mmdet

TOOLS = Path(mmdet.__file__).resolve().parent / ".mim" / "tools" / "analysis_tools"
TOLERANCE = 1e-3

CONFIG = """\
default_scope = 'mmdet'
dataset = dict(
    type='CocoDataset',
    data_root='',
    ann_file={ann!r},
    data_prefix=dict(img={img_dir!r}),
    metainfo=dict(classes={classes!r}),
    test_mode=True,
    pipeline=[])
test_dataloader = dict(batch_size=1, num_workers=0, dataset=dataset)
val_dataloader = test_dataloader
val_evaluator = dict(type='CocoMetric', ann_file={ann!r}, metric=['bbox', 'segm'])
test_evaluator = val_evaluator
"""


def oilleak_metrics(path: Path) -> tuple[dict, list[str]]:
    payload = json.loads(path.read_text())
    classes = list(payload["classes"])  # oilleak's label order: label k is classes[k], as in mmdet's metainfo
    return payload["metrics"], classes


def dataset_order(config: Path) -> list[int]:
    """The image ids of the config's dataset as mmdetection builds it: confusion_matrix.py pairs the pickle's
    i-th entry with ``dataset.get_data_info(i)``."""
    from mmengine import Config
    from mmengine.registry import init_default_scope

    from mmdet.registry import DATASETS

    cfg = Config.fromfile(str(config))
    init_default_scope("mmdet")
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    return [dataset.get_data_info(i)["img_id"] for i in range(len(dataset))]


def same(a: float, b: float | None) -> bool:
    """CocoMetric's -1.0 (no ground truth in a size bucket) is oilleak's null."""
    if b is None or b != b:
        return a == -1.0
    return abs(a - b) <= TOLERANCE


def mmdet_dump(config: Path, samples: list[dict], scale: tuple[int, int], out: Path) -> list:
    """oilleak's predictions put through what mmdetection's ``tools/test.py --out`` does around a model: its
    test pipeline (coco_instance.py's, at ``scale``), DetDataPreprocessor (pad to 32) and DumpDetResults
    (via an Evaluator, which calls ``to_dict()``); returns the list DumpDetResults dumped into ``out``."""
    import mmengine
    import numpy as np
    import torch
    from mmengine import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.evaluator import Evaluator
    from mmengine.registry import init_default_scope
    from mmengine.structures import InstanceData
    from pycocotools import mask as mask_util

    from mmdet.registry import DATASETS, MODELS

    init_default_scope("mmdet")
    cfg = Config.fromfile(str(config))
    cfg.test_dataloader.dataset.pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    preprocessor = MODELS.build(dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53],
                                     std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32))
    evaluator = Evaluator(dict(type="DumpDetResults", out_file_path=str(out)))
    evaluator.dataset_meta = dataset.metainfo
    for index, sample in enumerate(samples):
        data_sample = preprocessor(pseudo_collate([dataset[index]]), False)["data_samples"][0]
        theirs = sample["pred_instances"]
        pred = InstanceData()
        pred.bboxes, pred.scores, pred.labels = theirs["bboxes"], theirs["scores"], theirs["labels"]
        h, w = data_sample.ori_shape
        masks = mask_util.decode(theirs["masks"]) if theirs["masks"] else np.zeros((h, w, 0), np.uint8)
        pred.masks = torch.from_numpy(masks.transpose(2, 0, 1).astype(bool))  # as a model gives them: (n, h, w) bool
        data_sample.pred_instances = pred
        evaluator.process([data_sample])
    evaluator.evaluate(len(samples))
    return mmengine.load(str(out))


def differences(a, b, where: str = "") -> list[str]:
    """Where ``a`` and ``b`` differ in structure, type, dtype or value (dicts by key, whatever their order)."""
    import torch

    if type(a) is not type(b):
        return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}[{k!r}]")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor):
        same_tensor = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same_tensor else [f"{where}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)} or values"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def run(cmd: list[str]) -> str:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{cmd[1]} failed with exit status {proc.returncode}")
    return proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pkl", type=Path, help="oilleak test --out FILE.pkl")
    parser.add_argument("ann", type=Path, help="the split's COCO annotation file")
    parser.add_argument("metrics", type=Path, help="the same run's metrics.json")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the config and the png go (default: a temp dir)")
    parser.add_argument("--scale", type=int, nargs=2, metavar=("LONG", "SHORT"), default=None,
                        help="the test's data.scale: also dump oilleak's predictions through mmdetection's own test "
                             "pipeline and DumpDetResults and require that pickle to equal oilleak's")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mmdet_tools_"))
    work.mkdir(parents=True, exist_ok=True)
    metrics, classes = oilleak_metrics(args.metrics)
    import mmengine

    samples = mmengine.load(str(args.pkl))  # as the tools load it
    config = work / "mmdet_eval_config.py"
    img_dir = str(Path(samples[0]["img_path"]).parent) + "/"  # data_prefix; the tools read no pixels
    config.write_text(CONFIG.format(ann=str(args.ann.resolve()), img_dir=img_dir, classes=tuple(classes)))
    print(f"config {config}:\n{config.read_text()}")
    order_ok = [s["img_id"] for s in samples] == dataset_order(config)
    print(f"{len(samples)} images in the pickle, in mmdetection's dataset order: {order_ok}")

    ok = order_ok
    if args.scale:
        diffs = differences(samples, mmdet_dump(config, samples, tuple(args.scale), work / "mmdet_dump.pkl"))
        print(f"DumpDetResults on mmdetection's test pipeline at scale {args.scale}: {len(diffs)} differences "
              f"from oilleak's pickle (keys, types, dtypes, values: meta, tensors, RLE bytes)")
        for line in diffs[:20]:
            print("  " + line)
        ok = ok and not diffs

    out = run([sys.executable, str(TOOLS / "eval_metric.py"), str(config), str(args.pkl)])
    last = [line for line in out.splitlines() if line.startswith("{")][-1]
    theirs = ast.literal_eval(last)  # eval_metric.py prints the metrics dict
    print(last)

    save_dir = work / "confusion"
    run([sys.executable, str(TOOLS / "confusion_matrix.py"), str(config), str(args.pkl), str(save_dir)])
    png = save_dir / "confusion_matrix.png"

    print("\n| metric | mmdetection eval_metric.py | oilleak metrics.json | equal to 1e-3 |\n|---|---:|---:|---|")
    for key in theirs:  # coco/bbox_mAP ... coco/segm_mAP_l; bbox_mAP and segm_mAP are the proof, the rest shown
        name = key.split("/", 1)[1]
        a, b = theirs[key], metrics.get(name)
        equal = same(a, b)
        if name in ("bbox_mAP", "segm_mAP"):
            ok = ok and equal
        print(f"| {name} | {a:.3f} | {'null' if b is None else f'{b:.4f}'} | {'yes' if equal else 'NO'} |")
    size = png.stat().st_size if png.is_file() else 0
    print(f"\nconfusion_matrix.py wrote {png} ({size} bytes)" if size else f"\nconfusion_matrix.py wrote no {png}")
    ok = ok and size > 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
