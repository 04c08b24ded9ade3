"""The torchvision ops check: passes on the tested pair, and names the fix when the ops cannot load."""

from __future__ import annotations

import pytest
import torchvision.ops

from oilleak.deps import require_torchvision_ops
from oilleak.errors import OilleakError


def test_tested_pair_has_working_ops():
    require_torchvision_ops()


def test_missing_ops_give_the_install_fix(monkeypatch):
    def broken_nms(*args, **kwargs):  # what a torchvision built for another torch raises
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(torchvision.ops, "nms", broken_nms)
    with pytest.raises(OilleakError) as err:
        require_torchvision_ops()
    message = str(err.value)
    assert "torchvision::nms does not exist" in message
    assert "pip install" in message and "torch==2.14.1 torchvision==0.29.1" in message
