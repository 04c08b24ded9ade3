"""SAC's deformable convolution on CPU: torchvision's kernel against oilleak's vectorised one, op by op.

    python bench/bench_deform_conv.py [--repeats 3] [--threads 2]

The shapes of DetectoRS-R50's SAC convolutions on a 1333x800 image (input padded to 800x1344): layer2's first
block (stride 2) and the other blocks of layers 2-4, dilation 1 and 3 (SAC's two looks), random inputs with
offsets of a few pixels (the stride-2 first blocks of layers 3 and 4 are timed as their stride-1 blocks: same
output size). The two kernels run interleaved, ``--repeats`` times each; the minimum is reported
(the least disturbed run on a shared machine), with the largest relative difference between their outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

from oilleak.models.deform_conv import deform_conv2d

# (name, channels, input height, width, stride); how many such convolutions one image runs (both looks, both backbones)
SHAPES = [
    ("layer2.0 (stride 2)", 128, 200, 336, 2, 4),
    ("layer2.1-3", 128, 100, 168, 1, 12),
    ("layer3.*", 256, 50, 84, 1, 24),
    ("layer4.*", 512, 25, 42, 1, 12),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, totals = [], {"torchvision": 0.0, "vectorised": 0.0}
    with torch.inference_mode():
        for name, channels, height, width, stride, per_image in SHAPES:
            for dilation in (1, 3):
                generator = torch.Generator().manual_seed(0)
                x = torch.randn(1, channels, height, width, generator=generator)
                out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
                offset = torch.randn(1, 18, out_h, out_w, generator=generator) * 2
                weight = torch.randn(channels, channels, 3, 3, generator=generator) / (3 * channels**0.5)
                args_ = {"stride": (stride, stride), "padding": (dilation, dilation), "dilation": (dilation, dilation)}
                kernels = {
                    "torchvision": lambda: torchvision_deform_conv2d(x, offset, weight, **args_),
                    "vectorised": lambda: deform_conv2d(x, offset, weight, **args_),
                }
                times = {k: [] for k in kernels}
                outputs = {}
                for _ in range(args.repeats):
                    for key, kernel in kernels.items():
                        start = time.perf_counter()
                        outputs[key] = kernel()
                        times[key].append(time.perf_counter() - start)
                best = {k: min(v) for k, v in times.items()}
                ref = outputs["torchvision"]
                diff = float((outputs["vectorised"] - ref).abs().max() / ref.abs().max())
                for key in totals:
                    totals[key] += best[key] * per_image / 2  # per_image counts both dilations
                rows.append({"conv": f"{name} d{dilation}", "torchvision_s": round(best["torchvision"], 4),
                             "vectorised_s": round(best["vectorised"], 4),
                             "speedup": round(best["torchvision"] / best["vectorised"], 2), "max_rel_diff": diff})
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"threads": args.threads, "load_avg": os.getloadavg(),
                      "per_image_estimate_s": {k: round(v, 2) for k, v in totals.items()}}))


if __name__ == "__main__":
    main()
