"""Checks that the installed torch / torchvision can run the model's compiled ops."""

from __future__ import annotations

from oilleak.errors import OilleakError

TESTED_PAIR = "torch==2.14.1 torchvision==0.29.1"


def require_torchvision_ops() -> None:
    """Fail with the fix when torchvision's compiled ops (nms, roi_align, deform_conv2d) cannot load.

    The usual cause is a torchvision wheel built for another torch release (for example the CPU-only
    torch wheel beside torchvision from PyPI): ``operator torchvision::nms does not exist``.
    """
    try:
        import torch
        import torchvision
        from torchvision.ops import nms

        nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except Exception as exc:  # noqa: BLE001 - any failure here means the same fix
        versions = _versions()
        raise OilleakError(
            f"torchvision's compiled ops cannot load ({exc.__class__.__name__}: {exc}).\n"
            f"Installed: {versions}. torch and torchvision must be a matching pair.\n"
            f"Fix: pip install -c constraints.txt {TESTED_PAIR}  (the pair oilleak is tested with; on a machine "
            "without a GPU, both from one index: add --index-url https://download.pytorch.org/whl/cpu)"
        ) from None


def _versions() -> str:
    parts = []
    for name in ("torch", "torchvision"):
        try:
            mod = __import__(name)
            parts.append(f"{name} {mod.__version__}")
        except Exception:  # noqa: BLE001
            parts.append(f"{name} (not importable)")
    return ", ".join(parts)
