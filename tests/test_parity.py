"""``oilleak parity`` on the mmdet fixtures: the whole model reproduces mmdet 3.3, and the command notices
when it does not (a perturbed weight, a corrupted loss) or cannot tell (a file that is not a fixture).

End to end only the float64 fixtures are machine-independent (a random-weight DetectoRS amplifies float32
rounding ~30-fold per SAC stage, so float32 end-to-end outputs follow the CPU and thread count that made
them): they must match every row at 1 and at 2 threads. The float32 fixtures are held to their stage rows,
where every stage gets mmdet's own input."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from typer.testing import CliRunner

from oilleak.cli import app
from oilleak.parity import (
    END_TO_END,
    END_TO_END_LOSSES,
    STAGES,
    TOLERANCES,
    Check,
    ParityReport,
    compare_detections,
    compare_masks,
    explain_failures,
    run_parity,
)
from tests.conftest import F64_FIXTURE_NAMES, FIXTURE_NAMES

# DetectoRS (the network that amplifies rounding) at both thread counts, plain HTC at 2 (and at 1 through the CLI)
END_TO_END_RUNS = [(F64_FIXTURE_NAMES[0], 1), (F64_FIXTURE_NAMES[0], 2), (F64_FIXTURE_NAMES[1], 2)]


@pytest.fixture(scope="module", params=END_TO_END_RUNS, ids=[f"{name}-threads{n}" for name, n in END_TO_END_RUNS])
def report(request, fixtures_dir):
    name, threads = request.param
    return run_parity(fixtures_dir / name, threads=threads)


def test_every_check_passes(report):
    failures = [f"{c.section}: {c.name} ({c.detail})" for c in report.failures()]
    assert report.passed, failures
    assert report.dtype == "float64"
    # float64: every proposal and detection matched, not 99%
    for check in report.checks:
        if check.name in ("proposals", "detections (input pixels)", "detections"):
            matched, total = check.detail.split(" matched")[0].split("/")
            assert matched == total and int(total) > 0, (check.name, check.detail)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_stage_passes_in_float32(fixtures_dir, name):
    report = run_parity(fixtures_dir / name, end_to_end=False)
    assert report.dtype == "float32"
    assert {c.section for c in report.checks} == {"weights", STAGES}
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
    result = CliRunner().invoke(app, ["parity", str(fixtures_dir / "htc_small_f64.pt"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "checks pass" in result.output and "FAIL" not in result.output and "float64" in result.output


def test_cli_does_not_blame_rounding_for_a_corrupted_loss(fixtures_dir, tmp_path):
    fixture = torch.load(fixtures_dir / "htc_small_f64.pt", weights_only=True)
    fixture["losses"]["s1.loss_cls"] *= 1.01
    path = tmp_path / "corrupted_loss.pt"
    torch.save(fixture, path)
    result = CliRunner().invoke(app, ["parity", str(path), "--threads", "1"])
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())  # rich wraps lines at the terminal width
    assert "1 of" in output and "checks fail: end to end: losses: s1.loss_cls" in output
    assert "rounding cannot explain the failing losses" in output
    assert "amplified" not in output


def test_float64_fixtures_are_judged_at_float64_tolerances(fixtures_dir, tmp_path):
    """A loss 1e-5 off and a head output 3e-5 off pass float32's 1e-4, not a float64 fixture's tolerances."""
    fixture = torch.load(fixtures_dir / "htc_small_f64.pt", weights_only=True)
    fixture["losses"]["s1.loss_cls"] *= 1 + 1e-5
    pred = fixture["outputs"]["semantic_pred"]
    pred[(0,) * pred.dim()] += 3e-5 * float(pred.abs().max())  # compared only, never an input of another stage
    path = tmp_path / "slightly_off_f64.pt"
    torch.save(fixture, path)
    report = run_parity(path, threads=2)
    assert {(c.section, c.name) for c in report.failures()} == {(STAGES, "semantic pred"), (END_TO_END_LOSSES, "s1.loss_cls")}
    failed = {c.name: c.relative for c in report.failures()}
    assert failed["s1.loss_cls"] == pytest.approx(1e-5, rel=0.05) and failed["semantic pred"] == pytest.approx(3e-5, rel=0.05)
    assert all(value < TOLERANCES[torch.float32].feature for value in failed.values())


def test_float64_matching_is_tighter_hand_computed():
    f32, f64 = TOLERANCES[torch.float32], TOLERANCES[torch.float64]
    ref = {"bboxes": torch.tensor([[0.0, 0.0, 100.0, 100.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    for boxes, score in ((torch.tensor([[0.0, 0.0, 100.0, 100.08]]), 0.9),  # IoU 100/100.08 = 0.9992
                         (torch.tensor([[0.0, 0.0, 100.0, 100.0]]), 0.90005)):  # a score 5e-5 off
        assert compare_detections("s", "d", boxes, torch.tensor([score]), torch.tensor([1]), ref, f32)[0].passed
        assert not compare_detections("s", "d", boxes, torch.tensor([score]), torch.tensor([1]), ref, f64)[0].passed
    exact = {"bboxes": ref["bboxes"].double(), "scores": torch.tensor([0.9], dtype=torch.float64), "labels": ref["labels"]}
    # every corner 1e-4 px off: IoU 99.9999^2 / (2 * 100^2 - 99.9999^2) = 1 - 4.0e-6
    check, _ = compare_detections("s", "d", exact["bboxes"] + 1e-4, torch.tensor([0.9000001], dtype=torch.float64),
                                  torch.tensor([1]), exact, f64)
    assert check.passed and check.detail.endswith("worst score diff 1.00e-07, worst box IoU 1 - 4.00e-06")

    square = np.zeros((20, 30), dtype=np.uint8)
    square[0:10, 0:10] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    ref_rles = [{"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}]
    one_pixel_off = torch.from_numpy(square.astype(bool))[None].clone()
    one_pixel_off[0, 9, 9] = False  # IoU 0.99
    assert compare_masks("s", one_pixel_off, ref_rles, [(0, 0)], f32).passed
    assert not compare_masks("s", one_pixel_off, ref_rles, [(0, 0)], f64).passed


def _report(dtype: str, failing: set[str]) -> ParityReport:
    checks = [Check(section, "row", section not in failing) for section in ("weights", STAGES, END_TO_END, END_TO_END_LOSSES)]
    return ParityReport("f.pt", "detectors", checks, dtype=dtype)


def test_failure_explanations_follow_the_failing_sections():
    assert explain_failures(_report("float32", {STAGES})) == ""  # the stage row names the culprit
    assert explain_failures(_report("float32", {"weights", END_TO_END})) == ""
    assert "rounding cannot explain" in explain_failures(_report("float32", {END_TO_END_LOSSES}))
    float32 = explain_failures(_report("float32", {END_TO_END, END_TO_END_LOSSES}))
    assert "float32 rounding amplified" in float32 and "_f64.pt" in float32
    float64 = explain_failures(_report("float64", {END_TO_END}))
    assert "difference is real" in float64 and "rounding" not in float64


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
    report = run_parity(path, threads=1, end_to_end=False)
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

    (tmp_path / "folder.pt").mkdir()
    result = CliRunner().invoke(app, ["parity", str(tmp_path / "folder.pt")])
    assert result.exit_code == 2 and "is a directory" in result.output

    text = tmp_path / "notes.pt"
    text.write_text("model: detectors\n")
    result = CliRunner().invoke(app, ["parity", str(text)])
    assert result.exit_code == 2 and "is not a parity fixture: it is a text file" in result.output, result.output

    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    result = CliRunner().invoke(app, ["parity", str(noise)])
    assert result.exit_code == 2 and "is not a parity fixture" in result.output, result.output
    # a pickle that is not plain tensors: refused, and the unsafe weights_only=False is never suggested
    pickled = tmp_path / "pickled.pt"
    pickled.write_bytes(b"\x80\x04" + noise.read_bytes())
    result = CliRunner().invoke(app, ["parity", str(pickled)])
    assert result.exit_code == 2 and "will not unpickle" in result.output, result.output
    for output in (result.output,):
        assert "weights_only" not in output and "Traceback" not in output


def test_detection_matching_and_mask_iou_hand_computed():
    ref = {
        "bboxes": torch.tensor([[0.0, 0.0, 100.0, 100.0], [50.0, 50.0, 150.0, 150.0], [0.0, 0.0, 10.0, 10.0]]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([1, 2, 3]),
    }
    boxes = torch.tensor([[50.0, 50.0, 150.0, 150.0], [0.0, 0.0, 100.0, 100.05], [0.0, 0.0, 10.0, 10.0]])
    # box 0 = ref 1 exactly; box 1 ~ ref 0 (IoU 100/100.05 = 0.9995); box 2 = ref 2 but another label
    check, pairs = compare_detections("s", "dets", boxes, torch.tensor([0.8, 0.90005, 0.7]), torch.tensor([2, 1, 0]), ref)
    assert sorted(pairs) == [(0, 1), (1, 0)]
    assert not check.passed and check.detail.startswith("2/3 matched")
    # an IoU below 0.999 or a score 2e-4 off does not match
    _, pairs = compare_detections("s", "dets", boxes[:2] + torch.tensor([0.0, 0.0, 0.0, 0.2]), torch.tensor([0.8, 0.9]), torch.tensor([2, 1]), ref)
    assert pairs == []
    _, pairs = compare_detections("s", "dets", boxes[:1], torch.tensor([0.8002]), torch.tensor([2]), ref)
    assert pairs == []
    # zero-width boxes (clipped at the image edge; IoU undefined) match when their corners agree
    flat = {"bboxes": torch.tensor([[452.0, 10.0, 452.0, 90.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}
    _, pairs = compare_detections("s", "dets", torch.tensor([[452.0, 10.0, 452.0, 90.0005]]), torch.tensor([0.5]), torch.tensor([1]), flat)
    assert pairs == [(0, 0)]
    _, pairs = compare_detections("s", "dets", torch.tensor([[452.0, 10.0, 452.0, 90.01]]), torch.tensor([0.5]), torch.tensor([1]), flat)
    assert pairs == []

    square = np.zeros((20, 30), dtype=np.uint8)
    square[0:10, 0:10] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    ref_rles = [{"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}]
    same = torch.from_numpy(square.astype(bool))[None]
    assert compare_masks("s", same, ref_rles, [(0, 0)]).passed
    smaller = same.clone()
    smaller[0, 8:10] = False  # 80 of the 100 pixels: IoU 0.8
    check = compare_masks("s", smaller, ref_rles, [(0, 0)])
    assert not check.passed and "worst IoU 0.80000" in check.detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cli_device_cuda_without_a_gpu_is_a_clear_error(fixtures_dir):
    result = CliRunner().invoke(app, ["parity", str(fixtures_dir / "htc_small.pt"), "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "no CUDA GPU is visible" in result.output and "--device cpu" in result.output
