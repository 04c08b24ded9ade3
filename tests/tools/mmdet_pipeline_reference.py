"""What mmdetection 3.3's own data pipeline makes of a few real JPEGs: the reference for
tests/test_mmdet_pipeline.py. Run with the peer's python (../shared/peers/mmdet/setup_cpu.sh):

    .peer/bin/python tests/tools/mmdet_pipeline_reference.py [../shared/data/bsdata/train]

The images: two BSData photos as they are (a 1130x460 one and a 2724x850 one, shrunk about 5.4-fold, where
antialiasing would show), and two made here from the first photo and committed beside the reference: a
portrait crop, and the same crop stored sideways with EXIF orientation 6 (the decoder must turn it upright).
Each goes through mmdet's test pipeline (LoadImageFromFile, Resize(keep_ratio=True)) and, for the flip, its
train pipeline with RandomFlip(prob=1.0). The scale is reduced (500, 300) to keep the data small. Writes
tests/data/mmdet_pipeline/reference.npz: per case the RGB uint8 pixels (H, W, 3) and ori_shape, img_shape,
scale_factor, flip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parents[1] / "data" / "mmdet_pipeline"
SCALE = (500, 300)
PHOTOS = ("01_200902053521_585000_090_crop_2.jpg", "KGT2-V-314-A08_crop_3.jpg")


def make_derived_images(bsdata: Path) -> None:
    """portrait.jpg (a 600x840 crop) and exif_rotated.jpg (the same crop stored 840x600 with orientation 6)."""
    if (HERE / "portrait.jpg").exists() and (HERE / "exif_rotated.jpg").exists():
        return
    with Image.open(bsdata / PHOTOS[0]) as photo:
        crop = photo.convert("RGB").resize((1130 * 2, 460 * 2), Image.BICUBIC).crop((700, 20, 1300, 860))
    crop.save(HERE / "portrait.jpg", quality=90)
    sideways = crop.transpose(Image.Transpose.ROTATE_90)  # orientation 6 says: turn 90 degrees clockwise to view
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(HERE / "exif_rotated.jpg", quality=90, exif=exif)


def main() -> None:
    from mmcv.transforms import LoadImageFromFile
    from mmdet.datasets.transforms import RandomFlip, Resize

    bsdata = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[3] / "shared/data/bsdata/train")
    HERE.mkdir(parents=True, exist_ok=True)
    make_derived_images(bsdata)
    cases = {
        "photo": (bsdata / PHOTOS[0], False),
        "photo_flipped": (bsdata / PHOTOS[0], True),
        "wide": (bsdata / PHOTOS[1], False),
        "portrait": (HERE / "portrait.jpg", False),
        "exif_rotated": (HERE / "exif_rotated.jpg", False),
    }
    load, resize, flip = LoadImageFromFile(), Resize(scale=SCALE, keep_ratio=True), RandomFlip(prob=1.0)
    arrays: dict[str, np.ndarray] = {}
    for name, (path, flipped) in cases.items():
        results = resize(load({"img_path": str(path)}))
        if flipped:
            results = flip(results)
        arrays[f"{name}.pixels"] = np.ascontiguousarray(results["img"][..., ::-1])  # mmcv keeps BGR
        arrays[f"{name}.ori_shape"] = np.array(results["ori_shape"])
        arrays[f"{name}.img_shape"] = np.array(results["img_shape"])
        arrays[f"{name}.scale_factor"] = np.array(results["scale_factor"], dtype=np.float64)
        arrays[f"{name}.flip"] = np.array(bool(results.get("flip", False)))
        arrays[f"{name}.file"] = np.array(path.name)
        print(name, path.name, results["ori_shape"], "->", results["img_shape"], "flip", results.get("flip", False))
    import cv2
    import mmcv
    import mmdet

    arrays["versions"] = np.array(f"mmdet {mmdet.__version__}, mmcv {mmcv.__version__}, opencv {cv2.__version__}")
    np.savez_compressed(HERE / "reference.npz", **arrays)
    print("wrote", HERE / "reference.npz", arrays["versions"])


if __name__ == "__main__":
    main()
