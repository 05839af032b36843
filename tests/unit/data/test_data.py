"""Data layer: image readers, resizing, and manifest checks."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
import torch
from PIL import Image, PngImagePlugin

from conftest import dicom_bytes
from stagewise.data import (
    Cohort,
    CohortError,
    ImageReadError,
    load_cohort,
    load_images,
    read_image,
    to_square,
)
from stagewise.data.readers import read_image_bytes
from stagewise.recipe import CohortConfig


def write_dicom(path: Path, pixels: np.ndarray, **elements) -> Path:
    path.write_bytes(dicom_bytes(pixels, **elements))
    return path


RAMP = np.arange(0, 1001, 10, dtype=np.uint16).reshape(1, -1).repeat(4, axis=0)  # 0..1000


# --------------------------------------------------------------------------- readers


def test_png_8bit(tmp_path):
    arr = np.array([[0, 51], [255, 102]], dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.dtype == np.float32 and img.shape == (2, 2)
    np.testing.assert_allclose(img, arr / 255.0, atol=1e-6)


def test_png_16bit_scaled_by_bit_depth_not_max(tmp_path):
    arr = np.array([[0, 32768], [65535, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img[1, 0] == pytest.approx(1.0)
    assert img[0, 1] == pytest.approx(0.5, abs=1e-4)
    dim = np.full((3, 3), 1000, dtype=np.uint16)
    Image.fromarray(dim).save(tmp_path / "dim.png")
    assert read_image(tmp_path / "dim.png").max() == pytest.approx(1000 / 65535)


def test_rgb_jpeg_to_gray(tmp_path):
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[:, :8] = (200, 200, 200)
    rgb[:, 8:] = (0, 255, 0)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    img = read_image(tmp_path / "a.jpg")
    assert img.shape == (16, 16)
    assert img[8, 2] == pytest.approx(200 / 255, abs=0.03)
    assert img[8, 13] == pytest.approx(0.587, abs=0.03)  # luminance of pure green


def test_rgba_png_drops_alpha(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), 1.0)


def test_dicom_scaled_by_bits_stored_when_no_window(tmp_path):
    # storable-range-v1: stored values over what BitsStored can hold, not min-max of the image
    img = read_image(write_dicom(tmp_path / "a.dcm", RAMP))
    assert img.dtype == np.float32 and img.shape == RAMP.shape
    np.testing.assert_allclose(img, RAMP / 65535.0, atol=1e-7)
    img12 = read_image(write_dicom(tmp_path / "b.dcm", RAMP, BitsStored=12, HighBit=11))
    np.testing.assert_allclose(img12, RAMP / 4095.0, atol=1e-7)
    signed = read_image(write_dicom(tmp_path / "s.dcm", RAMP, BitsStored=12, HighBit=11, PixelRepresentation=1))
    np.testing.assert_allclose(signed, (RAMP + 2048.0) / 4095.0, atol=1e-7)  # -2048 .. 2047


def test_dicom_window_center_width(tmp_path):
    img = read_image(write_dicom(tmp_path / "a.dcm", RAMP, WindowCenter=500, WindowWidth=200))
    assert img[0, 30] == 0.0  # pixel 300, below the window
    assert img[0, 90] == 1.0  # pixel 900, above it
    assert img[0, 50] == pytest.approx(0.5, abs=0.01)
    assert img[0, 45] == pytest.approx(0.25, abs=0.01)


def test_dicom_rescale_applied_before_window(tmp_path):
    # Stored 0..1000 -> HU -1000..1000; a window around HU 0 only makes sense after rescaling.
    path = write_dicom(
        tmp_path / "a.dcm",
        RAMP,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=0,
        WindowWidth=400,
    )
    img = read_image(path)
    assert img[0, 35] == 0.0  # stored 350 = HU -300
    assert img[0, 65] == 1.0  # stored 650 = HU 300
    assert img[0, 50] == pytest.approx(0.5, abs=0.01)  # stored 500 = HU 0


def test_dicom_voi_lut_output_range_is_the_range_scaled_by(tmp_path):
    # a VOI LUT of 10-bit entries: its output 0..1023 is the range, not the stored 16 bits
    item = Dataset()
    item.LUTDescriptor = [1001, 0, 10]
    item.LUTData = [min(1023, v) for v in range(1001)]
    item["LUTData"].VR = "US"
    seq_path = write_dicom(tmp_path / "a.dcm", RAMP, VOILUTSequence=[item])
    img = read_image(seq_path)
    np.testing.assert_allclose(img, RAMP / 1023.0, atol=1e-7)
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", RAMP, VOILUTSequence=[item], PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1 - RAMP / 1023.0, atol=1e-6)  # inverted within the LUT's range


def test_dicom_negative_slope_inverts(tmp_path):
    # the rescaled range is -65535 .. 0: stored 0 is its brightest value
    img = read_image(write_dicom(tmp_path / "a.dcm", RAMP, RescaleSlope=-1, RescaleIntercept=0))
    assert img[0, 0] == 1.0 and img[0, -1] == pytest.approx(1 - 1000 / 65535)


def test_dicom_monochrome1_is_inverted(tmp_path):
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", RAMP))
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", RAMP, PhotometricInterpretation="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_dicom_without_extension_and_constant_image(tmp_path):
    img = read_image(write_dicom(tmp_path / "IM0001", np.full((3, 5), 7)))
    assert img.shape == (3, 5)
    np.testing.assert_allclose(img, 7 / 65535)


def test_dicom_multiframe_is_refused_alike_from_a_path_and_from_memory(tmp_path):
    """One rule for `predict` (a path) and `serve` (bytes): no frame of a series is chosen silently."""
    frames = np.stack([RAMP, RAMP[:, ::-1]])
    path = write_dicom(tmp_path / "a.dcm", frames.reshape(-1, RAMP.shape[1]), NumberOfFrames=2, Rows=4)
    with pytest.raises(ImageReadError, match="the DICOM file has 2 frames") as from_path:
        read_image(path)
    with pytest.raises(ImageReadError) as from_bytes:
        read_image_bytes(path.read_bytes(), "a.dcm")
    assert from_path.value.reason == from_bytes.value.reason


def png(path: Path, pixels: np.ndarray, sbit: int | None = None) -> Path:
    """Save `pixels` as a PNG (with an sBIT chunk when given), making its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = None
    if sbit is not None:
        info = PngImagePlugin.PngInfo()
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(pixels).save(path, pnginfo=info)
    return path


def test_same_stored_values_give_the_same_input_as_png_and_dicom(tmp_path):
    """storable-range-v1: one stored integer array gives one network input, PNG or DICOM."""
    rng = np.random.default_rng(3)
    a8 = rng.integers(0, 256, (24, 40)).astype(np.uint8)
    a8[0, :2] = (0, 255)
    a16 = a8.astype(np.uint16) << 8  # fills 16 bits
    a12 = rng.integers(0, 4096, (24, 40)).astype(np.uint16)  # raw 12-bit values, low bits in use
    cases = {
        "8-bit": (a8 / 255.0, [
            png(tmp_path / "a8.png", a8),
            png(tmp_path / "a8x257.png", a8.astype(np.uint16) * 257),  # 8 bits replicated to 16, as PNG scales
            write_dicom(tmp_path / "a8.dcm", a8, BitsAllocated=8),
            write_dicom(tmp_path / "a8in16.dcm", a8, BitsStored=8, HighBit=7),
        ]),
        "16-bit": (a16 / 65535.0, [png(tmp_path / "a16.png", a16), write_dicom(tmp_path / "a16.dcm", a16)]),
        "12-bit": (a12 / 4095.0, [
            png(tmp_path / "a12.png", a12, sbit=12),
            write_dicom(tmp_path / "a12.dcm", a12, BitsStored=12, HighBit=11),
        ]),
    }
    for name, (expected, paths) in cases.items():
        tensors = load_images(paths, 32, "pad")
        for path, tensor in zip(paths, tensors):
            img = read_image(path)
            np.testing.assert_allclose(img, expected, atol=1e-6, rtol=0, err_msg=f"{name}: {path.name}")
            assert np.array_equal(read_image_bytes(path.read_bytes(), path.name), img)
            torch.testing.assert_close(tensor, tensors[0], atol=1e-6, rtol=0, msg=f"{name}: {path.name}")


@pytest.mark.parametrize("name", ["a.png", "a.jpg", "a.dcm", "noext"])
def test_garbage_and_truncated_raise_image_read_error(tmp_path, name):
    if name == "a.png":
        Image.fromarray(np.zeros((64, 64), np.uint8) + 7).save(tmp_path / name)
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    elif name == "a.dcm":
        data = write_dicom(tmp_path / name, RAMP).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) - 500])
    else:
        (tmp_path / name).write_bytes(b"this is not an image\n" * 20)
    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / name)
    assert info.value.path == str(tmp_path / name)
    assert str(tmp_path / name) in str(info.value)


def test_missing_file_and_dicom_without_pixels(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "r.dcm").write_bytes(dicom_bytes())
    with pytest.raises(ImageReadError, match="no pixel data"):
        read_image(tmp_path / "r.dcm")


def test_image_read_error_pickles():
    err = pickle.loads(pickle.dumps(ImageReadError("/x.png", "broken")))
    assert (err.path, err.reason) == ("/x.png", "broken")


# --------------------------------------------------------------------------- preprocess


def test_to_square_pad_keeps_aspect():
    img = np.ones((50, 100), dtype=np.float32)
    out = to_square(img, 32, "pad")
    assert out.shape == (32, 32) and out.dtype == np.float32
    filled = np.flatnonzero(out[:, 16] > 0.5)
    assert (filled[0], filled[-1]) == (8, 23)  # 16 rows of image, centred
    assert np.all(out[:8] == 0) and np.all(out[24:] == 0)
    np.testing.assert_allclose(out[8:24], 1.0, atol=1e-5)


def test_to_square_crop_takes_centre():
    img = np.zeros((40, 120), dtype=np.float32)
    img[:, 40:80] = 1.0  # the central square
    out = to_square(img, 20, "crop")
    assert out.shape == (20, 20)
    np.testing.assert_allclose(out, 1.0, atol=1e-5)


def test_to_square_stretch_and_range():
    img = np.random.default_rng(0).random((300, 90)).astype(np.float32)
    out = to_square(img, 64, "stretch")
    assert out.shape == (64, 64)
    assert out.min() >= 0.0 and out.max() <= 1.0
    with pytest.raises(ValueError, match="pad"):
        to_square(img, 64, "zoom")


def test_load_images_tensor(tmp_path):
    paths = []
    for i, shape in enumerate([(30, 60), (60, 30), (40, 40)]):
        Image.fromarray(np.full(shape, 255, np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    out = load_images(paths, 16, "pad")
    assert out.shape == (3, 1, 16, 16) and out.dtype == torch.float16
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert float(out[2].min()) == pytest.approx(1.0, abs=1e-3)  # square image fills the frame


def test_load_images_progress_bar_path(tmp_path, monkeypatch):
    from stagewise.data import preprocess

    monkeypatch.setattr(preprocess, "_PROGRESS_OVER", 1)
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "a.png")
    out = load_images([tmp_path / "a.png", tmp_path / "a.png"], 8, "crop")
    assert out.shape == (2, 1, 8, 8) and float(out.min()) == 1.0


def test_load_images_collects_every_failure(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    paths = [tmp_path / "ok.png", tmp_path / "bad.png", tmp_path / "missing.dcm"]
    with pytest.raises(CohortError) as info:
        load_images(paths, 8, rows=[2, 3, 4])
    err = info.value
    assert len(err.problems) == 2
    assert err.problems[0].startswith(f"row 3: {tmp_path / 'bad.png'}: ")
    assert err.problems[1].startswith(f"row 4: {tmp_path / 'missing.dcm'}: ")
    assert "row 3" in str(err) and "row 4" in str(err) and "ok.png" not in str(err)


# --------------------------------------------------------------------------- cohort


def make_cohort(tmp_path: Path, csv: str, images: list[str] = (), **cfg) -> CohortConfig:
    for name in images:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name)
    (tmp_path / "manifest.csv").write_text(csv)
    return CohortConfig(manifest=tmp_path / "manifest.csv", **cfg)


def problems_of(cfg: CohortConfig) -> CohortError:
    with pytest.raises(CohortError) as info:
        load_cohort(cfg)
    return info.value


GOOD = (
    "path,outcome,patient,site,grade\n"
    "img/a.png,Y,p1,A,2\n"
    "img/b.png,y,p1,A,\n"
    "img/c.png,N,p2,B,1.5\n"
    "img/d.png, no ,p3,B,0\n"
)
GOOD_IMAGES = ["img/a.png", "img/b.png", "img/c.png", "img/d.png"]


def test_valid_manifest(tmp_path):
    cfg = make_cohort(tmp_path, GOOD, GOOD_IMAGES, site="site", clinical=["grade"])
    cohort = load_cohort(cfg)
    assert isinstance(cohort, Cohort)
    t = cohort.table
    assert list(t["row"]) == [2, 3, 4, 5]
    assert list(t["path"]) == [str(tmp_path / n) for n in GOOD_IMAGES]
    assert all(Path(p).is_absolute() for p in t["path"])
    assert list(t["y"]) == [1, 1, 0, 0] and t["y"].dtype == np.int64
    assert list(t["patient"]) == ["p1", "p1", "p2", "p3"]
    assert list(t["site"]) == ["A", "A", "B", "B"]
    assert t["grade"].tolist()[0] == 2.0 and np.isnan(t["grade"].iloc[1])
    assert (cohort.n_images, cohort.n_patients) == (4, 3)
    assert list(cohort.patients) == ["p1", "p2", "p3"]
    assert cohort.prevalence == pytest.approx(1 / 3)
    assert cohort.patient_labels().to_dict() == {"p1": 1, "p2": 0, "p3": 0}
    s = cohort.summary()
    assert (s["images"], s["patients"], s["positive_images"], s["negative_patients"]) == (4, 3, 2, 2)
    assert s["sites"]["B"] == {
        "images": 2,
        "patients": 2,
        "positive_images": 0,
        "negative_images": 2,
        "positive_patients": 0,
        "negative_patients": 2,
        "prevalence_patients": 0.0,
    }
    assert cohort.dropped == []


def test_root_absolute_paths_and_custom_labels(tmp_path):
    imgs = tmp_path / "elsewhere"
    csv = f"file,bpd,id\nx.png,BPD,1\n{tmp_path / 'abs.png'},none,2\n\n"
    cfg = make_cohort(
        tmp_path,
        csv,
        ["elsewhere/x.png", "abs.png"],
        image="file",
        outcome="bpd",
        patient="id",
        root=imgs,
        positive=["bpd"],
        negative=["NONE"],
    )
    t = load_cohort(cfg).table
    assert list(t["path"]) == [str(imgs / "x.png"), str(tmp_path / "abs.png")]
    assert list(t["y"]) == [1, 0]
    assert "site" not in t


def test_manifest_missing_and_empty(tmp_path):
    err = problems_of(CohortConfig(manifest=tmp_path / "nope.csv"))
    assert "nope.csv" in str(err) and "not found" in str(err)
    (tmp_path / "empty.csv").write_text("")
    assert "empty" in str(problems_of(CohortConfig(manifest=tmp_path / "empty.csv")))
    (tmp_path / "header.csv").write_text("path,outcome,patient\n\n")
    assert "no rows" in str(problems_of(CohortConfig(manifest=tmp_path / "header.csv")))


def test_unknown_columns_listed(tmp_path):
    cfg = make_cohort(tmp_path, GOOD, GOOD_IMAGES, outcome="Outcome", site="centre", clinical=["grde"])
    err = problems_of(cfg)
    assert len(err.problems) == 3
    msg = str(err)
    assert "'Outcome'" in msg and "'centre'" in msg and "'grde'" in msg
    assert "path, outcome, patient, site, grade" in msg
    assert "did you mean 'grade'" in msg


def test_every_row_problem_reported_together(tmp_path):
    csv = (
        "path,outcome,patient,grade\n"
        "a.png,1,p1,1\n"  # 2: fine
        "gone.png,0,p2,1\n"  # 3: missing file
        "b.png,,p3,1\n"  # 4: empty outcome
        "c.png,maybe,p4,1\n"  # 5: not binary
        "d.png,0,,1\n"  # 6: empty patient
        "e.png,0,p1,1\n"  # 7: p1 conflicting with row 2
        "a.png,1,p5,1\n"  # 8: duplicate of row 2
        "f.png,1,p6,high\n"  # 9: not a number
    )
    images = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    cfg = make_cohort(tmp_path, csv, images, clinical=["grade"])
    err = problems_of(cfg)
    msg = str(err)
    assert str(tmp_path / "manifest.csv") in msg.splitlines()[0]
    assert len(err.problems) == 7
    assert "row 3: gone.png: image file not found" in msg and str(tmp_path / "gone.png") in msg
    assert "row 4: b.png: the outcome (column 'outcome') is empty" in msg
    assert "drop_missing_outcome" in msg
    assert "row 5: c.png: outcome 'maybe'" in msg and "`positive:`" in msg and "yes" in msg
    assert "row 6: d.png: the patient id (column 'patient') is empty" in msg
    assert "patient 'p1' has conflicting outcomes: positive in row 2, negative in row 7" in msg
    assert f"rows 2, 8: {tmp_path / 'a.png'}: the same image" in msg
    assert "row 9: f.png: column 'grade': 'high' is not a number" in msg
    assert "set `root:`" in msg  # a missing file points at where relative paths are read from


def test_drop_missing_outcome(tmp_path):
    csv = "path,outcome,patient\na.png,1,p1\nb.png,,p2\nc.png,0,p3\n"
    cfg = make_cohort(tmp_path, csv, ["a.png", "b.png", "c.png"], drop_missing_outcome=True)
    cohort = load_cohort(cfg)
    assert list(cohort.table["row"]) == [2, 4]
    assert list(cohort.table["patient"]) == ["p1", "p3"]
    assert len(cohort.dropped) == 1 and cohort.dropped[0].startswith("row 3: b.png")
    (tmp_path / "manifest.csv").write_text("path,outcome,patient\na.png,,p1\nb.png, ,p2\n")
    assert "all 2 rows have an empty outcome" in str(problems_of(cfg))


def test_single_class(tmp_path):
    csv = "path,outcome,patient\na.png,1,p1\nb.png,,p2\nc.png,yes,p3\n"
    cfg = make_cohort(tmp_path, csv, ["a.png", "b.png", "c.png"], drop_missing_outcome=True)
    err = problems_of(cfg)
    assert len(err.problems) == 1 and "all 2 rows have a positive outcome" in str(err)


def test_patient_at_two_sites(tmp_path):
    csv = "path,outcome,patient,site\na.png,1,p1,A\nb.png,1,p1,B\nc.png,0,p2,A\n"
    cfg = make_cohort(tmp_path, csv, ["a.png", "b.png", "c.png"], site="site")
    msg = str(problems_of(cfg))
    assert "patient 'p1' appears at several sites" in msg and "row 2" in msg and "row 3" in msg


def test_error_list_capped_and_pickles():
    err = CohortError([f"row {i}: x" for i in range(60)], "m.csv")
    lines = str(err).splitlines()
    assert lines[0].startswith("m.csv: 60 problems")
    assert "  - row 49: x" in lines and "  - row 50: x" not in lines
    assert "  ... and 10 more" in lines
    copy = pickle.loads(pickle.dumps(err))
    assert copy.problems == err.problems and str(copy) == str(err)


def test_a_missing_image_of_a_manifest_points_to_the_manifest(tmp_path):
    from stagewise.data.image_checks import check_images

    with pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "nope.png")
    assert info.value.reason == "no such file"  # predict, evaluate: no manifest to name
    with pytest.raises(Exception) as info:
        check_images([str(tmp_path / "nope.png")], names=["nope.png"])
    assert "row 2: nope.png: no such file; check the image path in the manifest" in str(info.value)
