"""Paths shared by the tests. ``../shared`` (fixtures, BSData) sits beside the repository checkout;
OILLEAK_SHARED overrides where it is."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on 2 cores: one intra-op thread per worker (and per process a test starts), since
    # oversubscribed OpenMP threads made some tests 10x slower. Tests that need a count set it themselves.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OILLEAK_SHARED", REPO.parent / "shared"))
SAMPLE = REPO / "sample" / "bsdata"
BSDATA = SHARED / "data" / "bsdata" / "train"
FIXTURES = SHARED / "fixtures" / "mmdet"
# The mmdet parity fixtures, DetectoRS first. The float32 ones prove each stage on mmdet's own input (their
# end-to-end outputs depend on the CPU that made them); the float64 ones prove the model end to end anywhere.
FIXTURE_NAMES = ["detectors_htc_small.pt", "htc_small.pt"]
F64_FIXTURE_NAMES = ["detectors_htc_small_f64.pt", "htc_small_f64.pt"]


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests need ../shared beside the checkout (or OILLEAK_SHARED)")
    return path


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def bsdata_dir() -> Path:
    return _require(BSDATA)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return _require(FIXTURES)


def pytest_collection_modifyitems(config, items):
    """The files that hold slow tests run first, each file's tests kept together and in order: under xdist
    (`-n 2`) a long test then starts while the other worker still has the short ones to do, instead of
    starting last and running alone while the other worker sits idle (issue 29: 12 idle minutes)."""
    slow_files = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow_files)  # stable: the order within stays
