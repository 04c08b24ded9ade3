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


@pytest.mark.parametrize(("installed", "expected"), [
    ({"torch": "2.14.1+cu130", "torchvision": "0.29.1"}, []),
    ({"torch": "2.5.0", "torchvision": "0.20.0+cpu"}, []),  # the floor itself
    ({"torch": "2.5.0a0+git1234", "torchvision": "0.20.0a0"}, []),  # a source build of the floor
    ({"torch": "2.4.1", "torchvision": "0.19.1"}, ["torch 2.4.1 (needs >= 2.5)", "torchvision 0.19.1 (needs >= 0.20)"]),
    ({"torch": "2.2.0", "torchvision": "0.29.1"}, ["torch 2.2.0 (needs >= 2.5)"]),  # the old README's claim
    ({"torch": "10.0", "torchvision": None}, ["torchvision is not installed (needs >= 0.20)"]),
])
def test_floor_comparison_hand_cases(installed, expected):
    from oilleak import below_floor

    assert below_floor(installed) == expected


def test_an_old_torch_stops_every_command_at_import_with_the_fix(tmp_path):
    """A real `python -m oilleak` whose torch metadata says 2.3.1 (a dist-info placed first on the path)."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "torch-2.3.1.dist-info"
    fake.mkdir()
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.3.1\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    old = subprocess.run([sys.executable, "-m", "oilleak", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert old.returncode == 2 and "Traceback" not in old.stderr, old.stderr
    assert "oilleak cannot run with torch 2.3.1 (needs >= 2.5)." in old.stderr
    assert "Fix: pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1" in old.stderr
    current = subprocess.run([sys.executable, "-m", "oilleak", "--help"], capture_output=True, text=True, timeout=60)
    assert current.returncode == 0 and "cannot run" not in current.stderr
