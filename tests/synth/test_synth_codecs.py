"""Every transfer syntax the generator writes is lossless, decodes with pydicom and passes dcmtk."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset

from app.synth.codecs import TRANSFER_SYNTAXES, set_pixels
from app.synth.generate import generate, read_truth
from app.synth.render import Acquisition, Subject, render

# dcmtk decoders for the syntaxes it supports without extra modules (no JPEG 2000 in free dcmtk)
DCMTK_DECODER = {"jpeg_sv1": "dcmdjpeg", "jpegls": "dcmdjpls", "rle": "dcmdrle"}


def _dataset(arr: np.ndarray, bits: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    return ds


def _dcmdump_ok(path) -> None:
    r = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and "E:" not in r.stderr and "W:" not in r.stderr, r.stderr


@pytest.mark.parametrize("bits", [10, 12, 16])
@pytest.mark.parametrize("syntax", sorted(TRANSFER_SYNTAXES))
def test_lossless_roundtrip_pydicom_and_dcmtk(tmp_path, syntax, bits):
    acq = Acquisition(rows=120, cols=96, bits_stored=bits, monochrome1=True, marker="R", text=["S:200"])
    arr = render(Subject("chest", sex="F", age=25), acq, np.random.default_rng(bits))
    assert arr.max() < (1 << bits) and arr.std() > 0
    ds = _dataset(arr, bits)
    set_pixels(ds, arr, syntax)
    assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
    path = tmp_path / f"{syntax}.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = dcmread(path)
    assert back.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
    np.testing.assert_array_equal(back.pixel_array, arr)
    _dcmdump_ok(path)
    tool = DCMTK_DECODER.get(syntax)
    if tool and not shutil.which(tool):  # a skip, not a silent pass: CI=true fails on it
        pytest.skip(f"{tool} (dcmtk) is not installed: the cross-check with dcmtk's decoder needs it")
    if tool:
        out = tmp_path / "decoded.dcm"
        r = subprocess.run([tool, str(path), str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        np.testing.assert_array_equal(dcmread(out).pixel_array, arr)


def test_generated_collection_mixes_every_syntax_and_all_pass_dcmdump(tmp_path):
    generate(tmp_path, 6, seed=4, size="64x80", workers=1)
    rows = read_truth(tmp_path)
    counts = Counter(r["transfer_syntax"] for r in rows)
    assert set(counts) == {str(u) for u in TRANSFER_SYNTAXES.values()}
    paths = [str(tmp_path / r["file"]) for r in rows]
    r = subprocess.run(["dcmdump", "-q", *paths], capture_output=True, text=True)
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr[:2000]
    for p in paths:
        ds = dcmread(p)
        assert ds.pixel_array.shape == (80, 64)
