"""The corpus of tests/broken_images.py through load_image (what predict, test and training decode with),
`oilleak predict` and `oilleak convert` (labelme files pointing at them): every broken file is named with
what is wrong and the fix, the odd valid ones are read at their size, and no traceback reaches the user."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from broken_images import write_corpus
from oilleak.cli import app
from oilleak.data.transforms import load_image
from oilleak.errors import OilleakError
from serve_process import SMALL_SCALE, serve_ckpt  # noqa: F401 (a fixture)


def test_load_image_reads_the_odd_ones_at_their_size_and_names_the_broken_ones(tmp_path):
    """`oilleak predict`, `test` and training decode with load_image (OpenCV), not with the server's Pillow."""
    for sample in write_corpus(tmp_path):
        if sample.kind == "refuse":
            with pytest.raises(OilleakError, match=f"cannot read image {re.escape(str(tmp_path / sample.name))}: "):
                load_image(tmp_path / sample.name)
        elif sample.expect_size:
            image = load_image(tmp_path / sample.name)
            assert (image.shape[1], image.shape[0]) == sample.expect_size and image.dtype == np.uint8, sample.name


def test_predict_names_each_broken_file_and_goes_on(serve_ckpt, tmp_path):
    """Every broken file and the extreme valid one (1 x 1) in one `oilleak predict` run: one model pass."""
    samples = [s for s in write_corpus(tmp_path / "in") if s.kind == "refuse" or s.name == "one_pixel.png"]
    result = CliRunner().invoke(app, ["predict", str(serve_ckpt), *(str(tmp_path / "in" / s.name) for s in samples),
                                      "--out-dir", str(tmp_path / "out"), "--device", "cpu", "--score-thr", "0.99",
                                      "--set", SMALL_SCALE])
    assert result.exit_code == 0, result.output
    assert result.exception is None and "Traceback" not in result.output
    rows = {row["file"].rsplit("/", 1)[-1]: row for row in csv.DictReader((tmp_path / "out" / "summary.csv").open())}
    assert set(rows) == {s.name for s in samples}
    for sample in samples:
        row = rows[sample.name]
        if sample.kind == "refuse":
            assert row["status"].startswith(f"failed: cannot read image {tmp_path / 'in' / sample.name}: "), row
            assert "replace" in row["status"] and sample.name in result.output
        else:
            assert row["status"] == "ok" and (int(row["width"]), int(row["height"])) == (1, 1), row


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
    assert "BytesIO" not in result.output  # the message names the file, not Pillow's in-memory buffer
