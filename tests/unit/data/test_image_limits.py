"""The pixel limit: every reader checks what an image's header declares (rows x columns,
frames, voxels) before decoding it, so a small file declaring a huge image is refused in
moments instead of taking minutes and gigabytes; the limit can be raised."""

from __future__ import annotations

import os
import time
import warnings

import nibabel
import numpy as np
import pytest
from PIL import Image

from conftest import dicom_bytes
from stagewise.data import ImageReadError, read_image
from stagewise.data.reader_base import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV
from stagewise.data.readers import read_image_bytes
from stagewise.serve.refusals import read_problem


def _dicom(rows: int, cols: int, transfer_syntax) -> bytes:
    """An 8-bit DICOM of zeros, `rows` x `cols`, in `transfer_syntax` (deflate shrinks it to almost nothing)."""
    return dicom_bytes(np.zeros((rows, cols), np.uint8), transfer_syntax, BitsAllocated=8, Modality="OT")


def test_a_deflated_dicom_declaring_a_huge_image_is_refused_before_decoding(tmp_path):
    """12000 x 12000 pixels (over the default limit) in a file of a few hundred KB: refused in
    seconds, from a path (predict, studies) and from memory (serve, whose answer is 413)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    data = _dicom(12000, 12000, DeflatedExplicitVRLittleEndian)
    assert len(data) < 1_000_000 and 12000 * 12000 > DEFAULT_MAX_PIXELS
    path = tmp_path / "huge.dcm"
    path.write_bytes(data)
    started = time.monotonic()
    with pytest.raises(ImageReadError, match="declares 12000 x 12000 = 144,000,000 pixels") as err:
        read_image(path)
    assert MAX_PIXELS_ENV in err.value.reason
    with pytest.raises(ImageReadError) as in_memory:
        read_image_bytes(data, "upload.dcm")
    assert time.monotonic() - started < 20
    assert read_problem(in_memory.value).status == 413


def test_the_limit_holds_for_every_reader_and_can_be_raised(tmp_path, monkeypatch):
    from pydicom.uid import ExplicitVRLittleEndian

    png, dcm, nii = tmp_path / "a.png", tmp_path / "a.dcm", tmp_path / "a.nii.gz"
    Image.fromarray(np.zeros((60, 50), np.uint8)).save(png)
    dcm.write_bytes(_dicom(60, 50, ExplicitVRLittleEndian))
    nibabel.save(nibabel.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), nii)
    monkeypatch.setenv(MAX_PIXELS_ENV, "2000")
    for path, declared in ((png, "60 x 50 = 3,000"), (dcm, "60 x 50 = 3,000"), (nii, "20 x 20 x 20 = 8,000")):
        with pytest.raises(ImageReadError, match=f"declares {declared} pixels, more than the 2,000"):
            read_image(path)
        with pytest.raises(ImageReadError, match="declares"):
            read_image_bytes(path.read_bytes(), path.name)
    monkeypatch.setenv(MAX_PIXELS_ENV, "8000")
    assert read_image(png).shape == (60, 50) and read_image(dcm).shape == (60, 50)
    assert read_image(nii).shape == (20, 20, 20)


def test_pillows_bomb_warning_is_never_printed_raw(tmp_path, monkeypatch):
    """Over Pillow's own limit but within stagewise's: read, without Pillow's warning; over
    twice Pillow's limit (its hard refusal): one ImageReadError, not Pillow's exception."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "warned.png")
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(tmp_path / "refused.png")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert read_image(tmp_path / "warned.png").shape == (40, 40)
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    with pytest.raises(ImageReadError, match="declares more pixels than Pillow decodes"):
        read_image(tmp_path / "refused.png")


def test_an_invalid_limit_is_a_clear_error(tmp_path, monkeypatch):
    from stagewise.errors import StagewiseError

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(StagewiseError, match=f"^{MAX_PIXELS_ENV}='lots': give a positive whole number") as err:
        read_image(tmp_path / "a.png")
    assert not isinstance(err.value, ImageReadError)


@pytest.mark.parametrize("command", ["predict", "serve", "evaluate"])
def test_every_command_that_reads_images_takes_the_pixel_limit(command, tmp_path, monkeypatch):
    """predict, serve and evaluate all decode images a user hands them: each takes
    `--max-image-pixels`, sets the limit the readers use, and refuses a non-positive one."""
    from typer.testing import CliRunner

    from stagewise.cli import app

    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    args = {"predict": [str(tmp_path / "no-bundle"), str(tmp_path)], "serve": [str(tmp_path / "no-bundle")],
            "evaluate": [str(tmp_path / "no-bundle"), str(tmp_path / "m.csv")]}[command]
    refused = CliRunner().invoke(app, [command, *args, "--max-image-pixels", "0"])
    assert refused.exit_code == 2 and "--max-image-pixels must be a positive number" in refused.output
    try:  # the command sets the variable for this process: it must not outlive the test
        CliRunner().invoke(app, [command, *args, "--max-image-pixels", "4096"])  # fails later: no bundle there
        assert os.environ[MAX_PIXELS_ENV] == "4096"
    finally:
        os.environ.pop(MAX_PIXELS_ENV, None)
