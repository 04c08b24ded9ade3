"""Labelme images for the extra float64 parity fixtures of BENCHMARKS.md ("RPN losses against mmdetection"),
made from BSData photos into OUT_DIR: a portrait (a photo transposed), ground truth touching the top-left edge
and the bottom-right edge (the photo cropped through its stain), and the photo with the most stains (6).

    python bench/rpn_fixture_images.py ../shared/data/bsdata/train /tmp/fx/src
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image


def load(bsdata: Path, stem: str) -> tuple[dict, Image.Image]:
    return json.loads((bsdata / f"{stem}.json").read_text()), Image.open(bsdata / f"{stem}.jpg")


def save(out: Path, name: str, doc: dict, image: Image.Image) -> None:
    image.save(out / f"{name}.jpg", quality=95)
    doc.update(imagePath=f"{name}.jpg", imageData=None, imageWidth=image.size[0], imageHeight=image.size[1])
    (out / f"{name}.json").write_text(json.dumps(doc))


def main(bsdata: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc, image = load(bsdata, "01_200902053521_585000_090_crop_2")
    for shape in doc["shapes"]:
        shape["points"] = [[y, x] for x, y in shape["points"]]
    save(out, "portrait", doc, image.transpose(Image.Transpose.TRANSPOSE))
    stem = "01_200906233700_635000_270_crop_2"  # two stains
    doc, image = load(bsdata, stem)
    xs = [p[0] for s in doc["shapes"] for p in s["points"]]
    ys = [p[1] for s in doc["shapes"] for p in s["points"]]
    x0, y0 = int(min(xs)) + 3, int(min(ys)) + 3  # crop 3 px inside the stains' extremes: they touch the border
    for shape in doc["shapes"]:
        shape["points"] = [[max(x - x0, 0), max(y - y0, 0)] for x, y in shape["points"]]
    save(out, "edge", doc, image.crop((x0, y0, image.size[0], image.size[1])))
    doc, image = load(bsdata, stem)
    x1, y1 = int(max(xs)) - 3, int(max(ys)) - 3
    for shape in doc["shapes"]:
        shape["points"] = [[min(x, x1), min(y, y1)] for x, y in shape["points"]]
    save(out, "edge_br", doc, image.crop((0, 0, x1, y1)))
    save(out, "many", *load(bsdata, "KGT2-V-284-A08_crop_0"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
