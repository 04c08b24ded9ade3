"""The corpus of tests/broken_images.py through `oilleak predict` (a folder of them) and `oilleak convert`
(labelme files pointing at them): every broken file is named with what is wrong and the fix, the odd valid
ones are predicted at their size, and no traceback reaches the user."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from broken_images import write_corpus
from oilleak.cli import app
from serve_process import SMALL_SCALE, serve_ckpt  # noqa: F401 (a fixture)


@pytest.mark.slow  # 8 model passes and a model load: about 30 s on 2 free cores, minutes on a loaded machine
def test_predict_names_each_broken_file_and_reads_the_odd_ones(serve_ckpt, tmp_path):
    samples = write_corpus(tmp_path / "in")
    result = CliRunner().invoke(app, ["predict", str(serve_ckpt), str(tmp_path / "in"), "--out-dir", str(tmp_path / "out"),
                                      "--device", "cpu", "--score-thr", "0.99", "--set", SMALL_SCALE])
    assert result.exit_code == 0, result.output
    assert result.exception is None and "Traceback" not in result.output
    rows = {row["file"].rsplit("/", 1)[-1]: row for row in csv.DictReader((tmp_path / "out" / "summary.csv").open())}
    for sample in samples:
        if sample.name.endswith(".gif"):  # not among the extensions predict looks for in a folder
            assert sample.name not in rows
            continue
        row = rows[sample.name]
        if sample.kind == "refuse":
            assert row["status"].startswith(f"failed: cannot read image {tmp_path / 'in' / sample.name}: "), row
            assert "replace" in row["status"] and sample.name in result.output
        else:
            assert row["status"] == "ok", row
            if sample.expect_size:
                assert (int(row["width"]), int(row["height"])) == sample.expect_size, row


def test_convert_names_each_broken_image_of_a_labelme_folder(tmp_path):
    samples = write_corpus(tmp_path / "src")
    for sample in samples:
        width, height = sample.expect_size or (64, 48)
        (tmp_path / "src" / f"{sample.name}.json").write_text(json.dumps({
            "version": "5.0.1", "imagePath": sample.name, "imageData": None, "imageHeight": height, "imageWidth": width,
            "shapes": [{"label": "oil", "points": [[0, 0], [width, 0], [width, height]], "shape_type": "polygon"}]}))
    result = CliRunner().invoke(app, ["convert", str(tmp_path / "src"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "nothing written" in result.output and not (tmp_path / "out" / "annotations").exists()
    for sample in samples:
        if sample.kind == "refuse":
            assert f"{sample.name}.json: cannot read image {tmp_path / 'src' / sample.name} (" in result.output, sample.name
