"""``oilleak parity`` on the mmdet fixtures: the whole model reproduces mmdet 3.3, and the command notices
when it does not (a perturbed weight) or cannot tell (a file that is not a fixture)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from oilleak.cli import app
from oilleak.parity import END_TO_END, END_TO_END_LOSSES, STAGES, run_parity

FIXTURE_NAMES = ["detectors_htc_small.pt", "htc_small.pt"]


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def report(request, fixtures_dir):
    return run_parity(fixtures_dir / request.param)  # the fixtures' own thread count (2)


def test_every_check_passes(report):
    failures = [f"{c.section}: {c.name} ({c.detail})" for c in report.failures()]
    assert report.passed, failures


def test_every_stage_and_loss_is_checked(report, fixtures_dir):
    names = {(c.section, c.name) for c in report.checks}
    fixture = torch.load(fixtures_dir / report.fixture.split("/")[-1], weights_only=True)
    num_levels = len(fixture["outputs"]["neck"])
    expected = {("weights", "state dict")}
    expected |= {(STAGES, f"backbone C{i}") for i in range(2, 6)}
    expected |= {(STAGES, f"{what} P{i + 2}") for what in ("neck", "rpn_cls", "rpn_reg") for i in range(num_levels)}
    expected |= {(STAGES, name) for name in ("proposals", "semantic pred", "semantic feat", "detections (input pixels)")}
    expected |= {(STAGES, f"{what} stage {t}") for what in ("box cls", "box reg", "mask logits") for t in range(3)}
    expected |= {(END_TO_END, name) for name in ("backbone C5", "neck P2", "detections", "masks")}
    expected |= {(END_TO_END_LOSSES, key) for key in fixture["losses"]}
    if report.variant == "detectors":
        expected |= {(STAGES, f"ASPP P{i}") for i in range(3, 7)}
    assert expected <= names, sorted(expected - names)


def test_cli_passes(fixtures_dir):
    # htc matches at any thread count (only DetectoRS' random network amplifies rounding), so 1 is enough
    result = CliRunner().invoke(app, ["parity", str(fixtures_dir / "htc_small.pt"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "checks pass" in result.output and "FAIL" not in result.output


def test_cli_fails_on_a_wrong_weight(fixtures_dir, tmp_path):
    fixture = torch.load(fixtures_dir / "htc_small.pt", weights_only=True)
    weight = fixture["state_dict"]["roi_head.bbox_head.2.fc_cls.weight"]
    fixture["state_dict"]["roi_head.bbox_head.2.fc_cls.weight"] = weight + 0.01 * weight.abs().max()
    path = tmp_path / "perturbed.pt"
    torch.save(fixture, path)
    result = CliRunner().invoke(app, ["parity", str(path), "--threads", "1"])
    assert result.exit_code == 1, result.output
    assert "checks fail" in result.output
    # the failure is pinned to the perturbed stage: earlier stages still pass
    report = run_parity(path, threads=1)
    failing = {c.name for c in report.failures() if c.section == STAGES}
    assert "box cls stage 2" in failing
    assert not failing & {"box cls stage 0", "box cls stage 1", "proposals", "rpn_cls P2", "semantic feat"}


def test_cli_refuses_files_that_are_not_fixtures(fixtures_dir, tmp_path):
    not_fixture = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, not_fixture)
    result = CliRunner().invoke(app, ["parity", str(not_fixture)])
    assert result.exit_code == 2 and "not a parity fixture" in result.output

    fixture = torch.load(fixtures_dir / "htc_small.pt", weights_only=True)
    del fixture["outputs"]["proposals"], fixture["loss_inputs"]
    incomplete = tmp_path / "incomplete.pt"
    torch.save(fixture, incomplete)
    result = CliRunner().invoke(app, ["parity", str(incomplete)])
    assert result.exit_code == 2
    assert "'outputs.proposals'" in result.output and "'loss_inputs.gt_bboxes'" in result.output

    result = CliRunner().invoke(app, ["parity", str(tmp_path / "missing.pt")])
    assert result.exit_code == 2 and "does not exist" in result.output
