"""What `oilleak demo` needs around the other commands: the bundled sample, its config, an output folder.

The demo runs convert -> check -> train -> test -> predict on the BSData sample bundled in the repository
(`sample/bsdata`) with `configs/demo.yaml`. Training starts from the shipped demo weights
(`oilleak/demo_weights/tiny_bsdata_fp16.pth`: the tiny preset trained from scratch on the BSData images that
are not in the sample, see `demo_weights/README.md`) and fine-tunes them briefly, so the model finds stains. Its output folder carries a marker file, so a second demo may
replace the first one's output, while a folder the demo did not make is never touched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from oilleak.config import load_config, save_config
from oilleak.errors import OilleakError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample" / "bsdata"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
MARKER = ".oilleak-demo"
DEMO_WEIGHTS = Path(__file__).resolve().parent / "demo_weights" / "tiny_bsdata_fp16.pth"


def prepare_output(out: Path) -> None:
    """An empty ``out`` with the demo's marker; an earlier demo's output is replaced, nothing else."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise OilleakError(
                f"{out} exists and was not made by `oilleak demo`; the demo never writes into other folders. "
                "Pass another folder with --out."
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `oilleak demo`; a later demo replaces this folder\n", encoding="utf-8")


def write_demo_config(out: Path, template: Path = DEMO_CONFIG) -> Path:
    """configs/demo.yaml with its data and work folders inside ``out``; returns the written file."""
    if not template.is_file():
        raise OilleakError(f"{template} is missing: run the demo from an oilleak checkout (it ships configs/demo.yaml)")
    config = load_config(template)
    config.data.data_root, config.train.work_dir = str(out / "data"), str(out / "train")
    if DEMO_WEIGHTS.is_file():
        config.train.load_from = str(DEMO_WEIGHTS)
    path = out / "demo.yaml"
    save_config(config, path)
    return path


def demo_checkpoint(path: Path) -> Path:
    """The shipped demo weights as a checkpoint of the demo's config, not fine-tuned: a trained model for checks
    that need one (``tests/test_export.py``, ``bench/export_agreement.py``) without a training run."""
    from oilleak.models.checkpoint import load_weights, save_checkpoint
    from oilleak.models.presets import build_model

    config = load_config(DEMO_CONFIG)
    model = build_model(config.model, len(config.data.classes))
    load_weights(model, DEMO_WEIGHTS, classes=config.data.classes)
    save_checkpoint(path, model=model, config=config)
    return path


def sample_dir(sample: Path | None) -> Path:
    path = sample or SAMPLE
    if not any(path.glob("*.json")):
        raise OilleakError(
            f"no labelme files in {path}: the demo's sample ships in the oilleak repository (sample/bsdata); "
            "run it from a checkout, or pass a labelme folder with --sample"
        )
    return path


def trained_checkpoint(work_dir: Path) -> Path:
    """The checkpoint the demo evaluates and predicts with: the best one, else the latest."""
    for name in ("best.pth", "latest.pth"):
        if (work_dir / name).is_file():
            return work_dir / name
    raise OilleakError(f"training wrote no checkpoint into {work_dir}")


def weights_story(weights: Path = DEMO_WEIGHTS) -> str:
    """What the demo's model is, from the provenance stored in the shipped weights."""
    if not weights.is_file():
        return ("The tiny model was trained from random weights on the 8 sample images only (the demo weights "
                f"{weights} are missing), so it finds little; it shows the pipeline working.")
    import torch

    meta = torch.load(weights, map_location="cpu", weights_only=True).get("meta", {})
    return (
        f"The model is the tiny DetectoRS preset (base width 16, a demo model, not an oil-leak detector): trained "
        f"from random weights for {meta.get('iterations', '?')} iterations ({meta.get('train_s', '?')} s on "
        f"{meta.get('device', '?')}) on {meta.get('train_images', '?')} BSData images of pitting on ball screws "
        f"that are not in the demo's sample (val mask AP {meta.get('val_segm_mAP', '?')} there), then fine-tuned "
        "for a few iterations on the sample's 8 training images; the 2 val images above were never trained on. "
        "It is not trained on oil stains and is far weaker than the full model: real training uses "
        "configs/oilleak.yaml on a GPU with ImageNet or COCO weights (README)."
    )
