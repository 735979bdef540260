"""Preprocessing (LUTs, MONOCHROME1, resize/pad, JPEG 2000) and the instance cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from models.cache import build_cache, cache_root, entry_path, load_cached
from models.preprocess import PreprocessError, _j2k_reduced, preprocess_dataset, preprocess_file
from models.toydata import write_toy_dicom
from tests.conftest import testdata as _testdata


def _ds(stored: np.ndarray, **tags) -> FileDataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, tags.pop("PhotometricInterpretation", "MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    return ds


def test_rescale_then_window_maps_to_expected_grey_levels():
    stored = np.full((32, 32), 50, np.uint16)  # -> 2*50 - 100 = 0 HU-like units
    stored[:, 16:] = 150  # -> 200
    stored[8:24, 12:20] = 100  # -> 100, the window centre
    ds = _ds(stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=100, WindowWidth=200)
    img, orig = preprocess_dataset(ds, 32)
    assert orig == (32, 32) and img.shape == (32, 32) and img.dtype == np.uint8
    assert img[2, 2] == 0  # bottom of the window (0) is black
    assert img[2, 30] == 255  # top of the window (200) is white
    assert abs(int(img[16, 15]) - 128) <= 1  # the centre is mid-grey
    # the Modality LUT really is applied: without it, stored 50 sits a quarter into the window
    plain, _ = preprocess_dataset(_ds(stored, WindowCenter=100, WindowWidth=200), 32)
    assert abs(int(plain[2, 2]) - 64) <= 1 and abs(int(plain[2, 30]) - 192) <= 1


def test_monochrome1_is_inverted_to_the_same_display_image(tmp_path):
    a, b = tmp_path / "m2.dcm", tmp_path / "m1.dcm"
    write_toy_dicom(a, "LtK", np.random.default_rng(5), monochrome1=False)
    write_toy_dicom(b, "LtK", np.random.default_rng(5), monochrome1=True)
    img2, _ = preprocess_file(a, 40)
    img1, _ = preprocess_file(b, 40)
    assert np.abs(img2.astype(int) - img1.astype(int)).max() <= 1
    assert img2.mean() < 128  # background (low values) stays dark: no double inversion
    raw = pydicom.dcmread(b).pixel_array
    assert raw.mean() > 2048  # stored MONOCHROME1 values really are the inverted ones


def test_no_window_uses_the_full_range_and_aspect_ratio_is_kept():
    tall = np.zeros((40, 20), np.uint16)
    tall[:, :] = 1000
    tall[0, 0] = 0
    img, orig = preprocess_dataset(_ds(tall), 32)
    assert orig == (40, 20)
    # 40x20 -> 32x16, centred on a 32x32 black canvas
    assert (img[:, :8] == 0).all() and (img[:, 24:] == 0).all() and (img[4:28, 10:22] == 255).all()
    wide = np.full((20, 40), 1000, np.uint16)
    wide[0, 0] = 0
    img, _ = preprocess_dataset(_ds(wide), 32)  # 20x40 -> 32x64, centre-cropped to 32x32
    assert (img[4:28, :] == 255).all()


def test_jpeg2000_decodes_like_the_uncompressed_original():
    path = _testdata("RG1_J2KR.dcm")
    full, unc = preprocess_file(path, 64, reduced=False), preprocess_file(_testdata("RG1_UNCR.dcm"), 64)
    assert full[1] == unc[1] == (1955, 1841)
    assert np.array_equal(full[0], unc[0])  # reversible JPEG 2000, decoded in full: same pixels
    assert 20 < full[0].mean() < 235 and full[0].std() > 20  # a real image, not a flat field
    fast = preprocess_file(path, 64)  # reduced-resolution decode where glymur/libopenjp2 exist
    assert fast[1] == (1955, 1841)
    diff = np.abs(fast[0].astype(int) - unc[0].astype(int))
    assert diff.mean() < 3 and np.percentile(diff, 99) < 25  # the same picture, within resampling


def test_jpeg2000_reduced_resolution_decode_is_used_when_available():
    pytest.importorskip("glymur")
    from glymur.lib import openjp2

    if getattr(openjp2, "OPENJP2", None) is None:
        pytest.skip("the system libopenjp2 (Debian libopenjp2-7) is not installed")
    ds = pydicom.dcmread(_testdata("RG1_J2KR.dcm"))
    arr = _j2k_reduced(ds, 64)
    assert arr is not None and 64 <= arr.shape[0] < 1955 / 8  # 1955 rows at 1/16: 123 rows
    assert _j2k_reduced(ds, 1500) is None  # no level >= 2x smaller than needed: full decode


def test_undecodable_inputs_raise_preprocess_error(tmp_path):
    txt = tmp_path / "x.dcm"
    txt.write_text("not a dicom file")
    with pytest.raises(PreprocessError):
        preprocess_file(txt, 32)
    with pytest.raises(PreprocessError, match="not found"):
        preprocess_file(tmp_path / "missing.dcm", 32)
    short = _ds(np.zeros((32, 32), np.uint16))
    short.PixelData = b"\0" * 100  # truncated pixel data
    with pytest.raises(PreprocessError, match="decode"):
        preprocess_dataset(short, 32)


def test_cache_builds_once_reports_failures_and_keys_by_params(tmp_path):
    rng = np.random.default_rng(0)
    items = []
    for i, cls in enumerate(["C", "H", "E"]):
        uid = generate_uid()
        write_toy_dicom(tmp_path / f"{i}.dcm", cls, rng, sop_uid=uid)
        items.append({"sop_instance_uid": uid, "path": str(tmp_path / f"{i}.dcm")})
    bad = {"sop_instance_uid": generate_uid(), "path": str(tmp_path / "nope.dcm")}
    events = []
    errors = build_cache(items + [bad], tmp_path / "cache", 32, workers=2, progress=events.append)
    assert list(errors) == [bad["sop_instance_uid"]] and "not found" in errors[bad["sop_instance_uid"]]
    assert events[0] == {"event": "preprocess", "done": 0, "total": 4}
    assert events[-1] == {"event": "preprocess", "done": 4, "total": 4}
    imgs, orig = load_cached(items, tmp_path / "cache", 32)
    assert imgs.shape == (3, 32, 32) and imgs.dtype == np.uint8 and orig.tolist() == [[80, 64]] * 3
    assert np.array_equal(imgs[0], preprocess_file(items[0]["path"], 32)[0])
    entry = entry_path(cache_root(tmp_path / "cache", 32), items[0]["sop_instance_uid"])
    mtime = entry.stat().st_mtime_ns
    events.clear()
    build_cache(items, tmp_path / "cache", 32, progress=events.append)
    assert events[0]["done"] == 3 and entry.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert cache_root(tmp_path / "cache", 48) != cache_root(tmp_path / "cache", 32)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_data_side_modules_do_not_import_torch():
    code = ("import sys, models.preprocess, models.cache, models.metrics, models.config, models.toydata; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0
