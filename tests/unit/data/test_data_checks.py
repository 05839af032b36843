"""Cohort checks that need the image files decoded, and manifest edge cases (audit issue 9)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from stagewise.data import CohortError, check_images, load_cohort, read_image
from stagewise.data.image_checks import MIN_SIDE, inspect_images
from stagewise.data.readers import png_significant_bits
from stagewise.recipe import CohortConfig
from test_data import RAMP, png, write_dicom


def texture(seed: int, shape=(32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)



def cohort_cfg(tmp_path: Path, rows: list[tuple[str, str, str]], sep: str = ",", **cfg) -> CohortConfig:
    lines = [sep.join(("path", "outcome", "patient"))] + [sep.join(r) for r in rows]
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    return CohortConfig(manifest=tmp_path / "manifest.csv", **cfg)


def cohort_error(cfg: CohortConfig, **kw) -> CohortError:
    with pytest.raises(CohortError) as info:
        load_cohort(cfg, **kw)
    return info.value


# --------------------------------------------------------------------------- 1: decode every file


def broken_files(tmp_path: Path) -> dict[str, str]:
    """name -> what is wrong; every one of them passes the manifest-only checks."""
    (tmp_path / "empty.png").write_bytes(b"")
    png(tmp_path / "full.png", texture(0, (64, 64)))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("patient notes, not an image\n" * 10)
    dcm = write_dicom(tmp_path / "full.dcm", RAMP).read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(dcm[:-300])
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "text.dcm").write_text("a report\n" * 30)
    return {
        "empty.png": "empty (0 bytes)",
        "truncated.png": "not a readable image",
        "text.png": "not a readable image",
        "truncated.dcm": "DICOM",
        "empty.dcm": "empty (0 bytes)",
        "text.dcm": "no pixel data",
    }


def test_decode_reports_every_unreadable_file_with_its_row(tmp_path):
    bad = broken_files(tmp_path)
    png(tmp_path / "ok1.png", texture(1))
    png(tmp_path / "ok2.png", texture(2))
    names = ["ok1.png", *bad, "ok2.png"]
    rows = [(n, "1" if i % 2 else "0", f"p{i}") for i, n in enumerate(names)]
    cfg = cohort_cfg(tmp_path, rows)
    assert load_cohort(cfg).n_images == len(names)  # the manifest alone is fine
    err = cohort_error(cfg, decode=True)
    assert len(err.problems) == len(bad)
    for line, name in enumerate(names, start=2):
        hits = [p for p in err.problems if p.startswith(f"row {line}: {name}: ")]
        if name in bad:
            assert len(hits) == 1 and bad[name] in hits[0], (name, err.problems)
        else:
            assert not hits
    assert str(tmp_path / "manifest.csv") in str(err).splitlines()[0]
    assert "remove their rows" in str(err)


def test_check_images_public_api(tmp_path):
    bad = broken_files(tmp_path)
    png(tmp_path / "ok.png", texture(3))
    cfg = cohort_cfg(tmp_path, [("ok.png", "1", "a"), ("empty.png", "0", "b"), ("text.dcm", "1", "c")])
    cohort = load_cohort(cfg)
    with pytest.raises(CohortError) as info:
        check_images(cohort)
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == ["row 3", "row 4"]
    assert problems[0].startswith("row 3: empty.png: ") and problems[1].startswith("row 4: text.dcm: ")
    assert info.value.manifest == str(cfg.manifest)
    # a list of paths, rows given; results keep the input order whatever the thread count
    paths = [tmp_path / n for n in ["ok.png", *bad, "ok.png"]]
    seen = []
    for workers in (1, 3):
        with pytest.raises(CohortError) as info:
            check_images(paths, rows=range(10, 10 + len(paths)), workers=workers)
        seen.append(info.value.problems)
    assert seen[0] == seen[1] and len(seen[0]) == len(bad)
    assert seen[0][0].startswith(f"row 11: {paths[1]}: ")
    assert check_images([tmp_path / "ok.png"]) == []


def test_decode_valid_cohort_has_no_problems_or_warnings(tmp_path):
    png(tmp_path / "a.png", texture(4))
    write_dicom(tmp_path / "b.dcm", RAMP.repeat(3, axis=0), BitsStored=10, HighBit=9)  # 0..1000 of 1023
    png(tmp_path / "c.png", (texture(5).astype(np.uint16) * 257))
    cohort = load_cohort(
        cohort_cfg(tmp_path, [("a.png", "1", "p1"), ("b.dcm", "0", "p2"), ("c.png", "0", "p3")]), decode=True
    )
    assert cohort.n_images == 3 and cohort.warnings == []


def test_decode_manifest_and_image_problems_reported_together(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"GIF89a garbage")
    png(tmp_path / "ok.png", texture(6))
    cfg = cohort_cfg(tmp_path, [("ok.png", "1", "p1"), ("bad.png", "maybe", "p2"), ("gone.png", "0", "p3")])
    msg = str(cohort_error(cfg, decode=True))
    assert "row 3: bad.png: outcome 'maybe'" in msg
    assert "row 3: bad.png: not a readable image" in msg
    assert "row 4: gone.png: image file not found" in msg
    assert msg.count("row 4") == 1  # a missing file is reported once, not again as unreadable


# --------------------------------------------------------------------------- 2: bit depth


def test_png_sbit_12_bit_data_in_16_bit_png(tmp_path):
    raw = np.random.default_rng(0).integers(0, 3671, (16, 16)).astype(np.uint16)
    raw[0, 0] = 3670
    path = png(tmp_path / "a.png", raw, sbit=12)
    assert png_significant_bits(path) == 12
    img = read_image(path)
    assert img.max() == pytest.approx(3670 / 4095)
    np.testing.assert_array_equal(img, raw.astype(np.float32) / np.float32(4095))


def test_png_sbit_with_shifted_data_keeps_bit_depth_scaling(tmp_path):
    # Spec-conforming writers shift n-bit data up to 16 bits; then /65535 is right already.
    raw = (np.random.default_rng(1).integers(0, 4096, (16, 16)).astype(np.uint16) << 4)
    path = png(tmp_path / "a.png", raw, sbit=12)
    np.testing.assert_array_equal(read_image(path), raw.astype(np.float32) / np.float32(65535.0))
    dark = (np.arange(64, dtype=np.uint16).reshape(8, 8) << 4)  # dark, shifted: < 4096 but low bits zero
    path = png(tmp_path / "dark.png", dark, sbit=12)
    np.testing.assert_array_equal(read_image(path), dark.astype(np.float32) / np.float32(65535.0))


def test_sbit_chunk_found_after_other_chunks_and_ignored_elsewhere(tmp_path):
    raw = np.arange(256, dtype=np.uint16).reshape(16, 16) * 3
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x" * 5000)
    info.add(b"sBIT", b"\x0a")
    Image.fromarray(raw).save(tmp_path / "a.png", pnginfo=info)
    assert png_significant_bits(tmp_path / "a.png") == 10
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), raw.astype(np.float32) / np.float32(1023))
    # 8-bit PNG with sBIT, sBIT = 16, a truncated header: no effect, no crash
    png(tmp_path / "b.png", texture(7), sbit=5)
    assert png_significant_bits(tmp_path / "b.png") is None
    png(tmp_path / "c.png", raw, sbit=16)
    assert png_significant_bits(tmp_path / "c.png") is None
    (tmp_path / "d.png").write_bytes((tmp_path / "a.png").read_bytes()[:20])
    assert png_significant_bits(tmp_path / "d.png") is None
    assert png_significant_bits(tmp_path / "nope.png") is None


def test_valid_images_read_bit_for_bit_as_before(tmp_path):
    """Pixel values of ordinary files must not move: studies must reproduce their numbers."""
    a8 = texture(8, (20, 30))
    p8 = png(tmp_path / "a8.png", a8)
    np.testing.assert_array_equal(read_image(p8), a8.astype(np.float32) / np.float32(255.0))
    a16 = np.random.default_rng(9).integers(0, 65536, (20, 30)).astype(np.uint16)
    p16 = png(tmp_path / "a16.png", a16)
    np.testing.assert_array_equal(read_image(p16), a16.astype(np.float32) / np.float32(65535.0))
    low = (a16 >> 4).astype(np.uint16)  # 12-bit data without sBIT: still by bit depth (warned about)
    plow = png(tmp_path / "low.png", low)
    np.testing.assert_array_equal(read_image(plow), low.astype(np.float32) / np.float32(65535.0))
    img = read_image(write_dicom(tmp_path / "a.dcm", RAMP))  # storable-range-v1: by BitsStored (16)
    np.testing.assert_array_equal(img, (RAMP / 65535.0).astype(np.float32))


def test_nearly_black_images_warned_once_listing_rows(tmp_path):
    rng = np.random.default_rng(10)
    for name in ("a.png", "b.png"):
        png(tmp_path / name, rng.integers(0, 3671, (16, 16)).astype(np.uint16))  # 12-bit, no sBIT
    png(tmp_path / "c.png", texture(11))
    png(tmp_path / "d.png", rng.integers(0, 3671, (16, 16)).astype(np.uint16), sbit=12)  # honoured
    cfg = cohort_cfg(tmp_path, [("a.png", "1", "p1"), ("b.png", "0", "p2"), ("c.png", "1", "p3"), ("d.png", "0", "p4")])
    cohort = load_cohort(cfg, decode=True)
    assert len(cohort.warnings) == 1
    w = cohort.warnings[0]
    assert w.startswith("2 images use less than 1/16")
    assert "row 2 a.png" in w and "row 3 b.png" in w and "c.png" not in w and "d.png" not in w
    assert "16-bit PNG without sBIT" in w and "of 65535" in w
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported through Cohort.warnings, not once per file
        assert check_images(cohort) == cohort.warnings


# --------------------------------------------------------------------------- 3: tiny and constant


def test_tiny_and_constant_images_are_problems(tmp_path):
    png(tmp_path / "one.png", np.array([[200]], np.uint8))
    png(tmp_path / "thin.png", texture(12, (MIN_SIDE - 1, 300)))
    png(tmp_path / "flat.png", np.full((64, 64), 128, np.uint8))
    write_dicom(tmp_path / "flat.dcm", np.full((16, 16), 900))
    png(tmp_path / "ok.png", texture(13, (MIN_SIDE, MIN_SIDE)))
    cfg = cohort_cfg(
        tmp_path,
        [("one.png", "1", "a"), ("thin.png", "0", "b"), ("flat.png", "1", "c"), ("flat.dcm", "0", "d"), ("ok.png", "1", "e")],
    )
    err = cohort_error(cfg, decode=True)
    assert len(err.problems) == 4
    assert err.problems[0].startswith("row 2: one.png: the image is only 1x1 pixels")
    assert err.problems[1].startswith("row 3: thin.png: the image is only 300x7 pixels")
    assert err.problems[2].startswith("row 4: flat.png: every pixel has the same value")
    assert err.problems[3].startswith("row 5: flat.dcm: every pixel has the same value")


def test_mixed_2d_and_3d_reported(tmp_path):
    nib = pytest.importorskip("nibabel")
    vol = np.random.default_rng(0).random((10, 10, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii.gz"))
    png(tmp_path / "a.png", texture(14))
    problems, _ = inspect_images([tmp_path / "a.png", tmp_path / "v.nii.gz"], [2, 3], ["a.png", "v.nii.gz"])
    assert len(problems) == 1 and problems[0].startswith("row 3: v.nii.gz: a 3D volume, but row 2 (a.png) is a 2D image")


# --------------------------------------------------------------------------- 4: one image, two patients


def test_same_file_through_symlink_under_two_patients(tmp_path):
    png(tmp_path / "a.png", texture(15))
    png(tmp_path / "b.png", texture(16))
    os.symlink(tmp_path / "a.png", tmp_path / "link.png")
    cfg = cohort_cfg(tmp_path, [("a.png", "1", "p1"), ("b.png", "1", "p2"), ("link.png", "0", "p3")])
    err = cohort_error(cfg)  # found without decoding
    assert len(err.problems) == 1
    msg = err.problems[0]
    assert msg.startswith("rows 2, 4: a.png, link.png are one and the same file")
    assert str(tmp_path / "a.png") in msg and "'p1', 'p3'" in msg and "leaks" in msg


def test_same_file_through_hard_link(tmp_path):
    png(tmp_path / "a.png", texture(17))
    os.link(tmp_path / "a.png", tmp_path / "copy.png")
    png(tmp_path / "b.png", texture(18))
    cfg = cohort_cfg(tmp_path, [("a.png", "1", "p1"), ("copy.png", "1", "p1"), ("b.png", "0", "p2")])
    err = cohort_error(cfg)
    assert len(err.problems) == 1 and err.problems[0].startswith("rows 2, 3: a.png, copy.png are one and the same file")
    assert "leaks" not in err.problems[0]  # one patient: a duplicate, not a leak


def test_identical_pixels_under_different_patients(tmp_path):
    pixels = texture(19)
    png(tmp_path / "x/a.png", pixels)
    (tmp_path / "y").mkdir()
    Image.fromarray(pixels).save(tmp_path / "y/a_copy.png", compress_level=1)  # other bytes, same pixels
    png(tmp_path / "other.png", texture(20))
    png(tmp_path / "same1.png", texture(21))
    (tmp_path / "same2.png").write_bytes((tmp_path / "same1.png").read_bytes())
    assert (tmp_path / "x/a.png").read_bytes() != (tmp_path / "y/a_copy.png").read_bytes()
    cfg = cohort_cfg(
        tmp_path,
        [
            ("x/a.png", "1", "p1"),
            ("other.png", "0", "p2"),
            ("y/a_copy.png", "0", "p3"),
            ("same1.png", "1", "p4"),
            ("same2.png", "1", "p4"),
        ],
    )
    assert load_cohort(cfg).n_images == 5  # different files: only decoding shows it
    err = cohort_error(cfg, decode=True)
    assert len(err.problems) == 1
    msg = err.problems[0]
    assert msg.startswith("rows 2, 4 hold identical pixels: x/a.png (patient 'p1'), y/a_copy.png (patient 'p3')")
    assert "leaks between training and test folds" in msg
    # the same image twice for one patient is a warning, not a leak
    (tmp_path / "y/a_copy.png").unlink()
    png(tmp_path / "y/a_copy.png", texture(22))
    cohort = load_cohort(cfg, decode=True)
    assert len(cohort.warnings) == 1
    assert cohort.warnings[0].startswith("rows 5, 6 hold identical pixels: same1.png (patient 'p4'), same2.png")


# --------------------------------------------------------------------------- 5: separators


@pytest.mark.parametrize("sep", [";", "\t"])
def test_semicolon_and_tab_manifests_are_read(tmp_path, sep):
    for i in range(3):
        png(tmp_path / f"{i}.png", texture(30 + i))
    rows = [("0.png", "1", "p1"), ("1.png", "0", "p2"), ("2.png", "no", "p3")]
    comma = load_cohort(cohort_cfg(tmp_path, rows)).table
    other = load_cohort(cohort_cfg(tmp_path, rows, sep=sep)).table
    assert comma.equals(other)


def test_semicolon_manifest_with_decimal_commas(tmp_path):
    png(tmp_path / "a.png", texture(40))
    png(tmp_path / "b.png", texture(41))
    (tmp_path / "m.csv").write_text("path;outcome;patient;age\na.png;1;p1;1,5\nb.png;0;p2;2\n")
    err = cohort_error(CohortConfig(manifest=tmp_path / "m.csv", clinical=["age"]))
    assert len(err.problems) == 1
    assert err.problems[0] == (
        "row 2: a.png: column 'age': '1,5' is not a number; leave the cell empty for a missing value; "
        "write decimals with a point (1.5, not 1,5)"
    )


def test_semicolon_manifest_with_wrong_names_says_so(tmp_path):
    (tmp_path / "m.csv").write_text("file;label;id\na.png;1;p1\n")
    err = cohort_error(CohortConfig(manifest=tmp_path / "m.csv"))
    assert len(err.problems) == 4
    assert err.problems[-1].startswith("the manifest seems to be separated by ';', not commas")


def test_comma_manifest_with_semicolons_in_values_is_untouched(tmp_path):
    png(tmp_path / "a;b.png", texture(42))
    png(tmp_path / "c.png", texture(43))
    (tmp_path / "m.csv").write_text("path,outcome,patient\na;b.png,1,p;1\nc.png,0,p2\n")
    t = load_cohort(CohortConfig(manifest=tmp_path / "m.csv")).table
    assert list(t["patient"]) == ["p;1", "p2"] and t["path"][0].endswith("a;b.png")


# --------------------------------------------------------------------------- speed


def test_check_images_handles_many_files_quickly(tmp_path):
    import time

    paths = [png(tmp_path / f"{i}.png", texture(100 + i, (128, 128))) for i in range(120)]
    t0 = time.perf_counter()
    assert check_images(paths, patients=[f"p{i}" for i in range(120)]) == []
    assert time.perf_counter() - t0 < 20
