"""The peer's time on a real photo: mmdet 3.3 DetectoRS-HTC-R50, random weights, the photo through mmdet's own
test pipeline (LoadImageFromFile, Resize 1333x800 keep_ratio, PackDetInputs, the model's data_preprocessor).

Runs in the peer's venv (../shared/peers/mmdet/setup_cpu.sh), never in oilleak's; bench_inference.py --peer calls it.
    VENV/bin/python bench/mmdet_photo_latency.py PHOTO RUNS [CLASSES]
Weights are built exactly as the peer's mmdet_cpu_latency.py builds them (seed 0, ConvAWS gamma/beta matched).
"""
import os
import sys
import time

import mmdet
import numpy as np
import torch
from mmcv.cnn import ConvAWS2d
from mmcv.transforms import Compose
from mmengine.config import Config
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules

register_all_modules()
torch.manual_seed(0)
photo, runs = sys.argv[1], int(sys.argv[2])
classes = int(sys.argv[3]) if len(sys.argv) > 3 else 6
cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), ".mim/configs/detectors/detectors_htc-r50_1x_coco.py"))
cfg.model.backbone.init_cfg = None
cfg.model.neck.rfp_backbone.pretrained = None
for head in cfg.model.roi_head.bbox_head + cfg.model.roi_head.mask_head:
    head.num_classes = classes
cfg.model.roi_head.semantic_head.num_classes = classes + 1
model = MODELS.build(cfg.model)
model.init_weights()
for m in model.modules():
    if isinstance(m, ConvAWS2d):
        flat = m.weight.data.view(m.weight.size(0), -1)
        m.weight_beta.data.copy_(flat.mean(1).view(-1, 1, 1, 1))
        m.weight_gamma.data.copy_(torch.sqrt(flat.var(1) + 1e-5).view(-1, 1, 1, 1))
model.eval()
pipeline = Compose([
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(1333, 800), keep_ratio=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
])
times = []
with torch.no_grad():
    for _ in range(runs + 1):  # the first run is the warm-up
        start = time.perf_counter()
        data = model.data_preprocessor({"inputs": [(sample := pipeline({"img_path": photo, "img_id": 0}))["inputs"]],
                                        "data_samples": [sample["data_samples"]]}, False)
        result = model(**data, mode="predict")
        times.append(time.perf_counter() - start)
print("photo", photo, "input", tuple(data["inputs"].shape[-2:]), "dets", len(result[0].pred_instances),
      "times", [round(t, 2) for t in times])
print("median_s", float(np.median(times[1:])))
