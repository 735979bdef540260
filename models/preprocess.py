"""DICOM -> fixed-size uint8 image: Modality LUT, VOI LUT/window, MONOCHROME1 inversion, resize, pad.

Pure numpy/pydicom/PIL (no torch), so cache workers start fast.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageFile
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut, apply_voi_lut

# Bump when the output of `preprocess_dataset` changes: it is part of the cache key.
PREPROCESS_VERSION = 3  # 3: in-memory reduced JPEG 2000 decode (Pillow), level from the short side

# JPEG 2000 (and HTJ2K) transfer syntaxes: OpenJPEG can decode them at reduced resolution.
J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}


class PreprocessError(Exception):
    """The file cannot be turned into an image (unreadable, no pixels, unsupported codec)."""


def preprocess_params(image_size: int) -> dict:
    """The parameters that determine the cached pixels (hashed into the cache key)."""
    return {"version": PREPROCESS_VERSION, "image_size": int(image_size)}


def _first(v):
    if v is None:
        return None
    if isinstance(v, pydicom.multival.MultiValue):
        return float(v[0]) if len(v) else None
    return float(v)


def _window(arr: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Window to [0, 1] per PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID)."""
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - center) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        lo, span = center - width / 2.0, max(width, 1e-6)
    else:  # LINEAR: width must be >= 1
        width = max(width, 1.0)
        lo, span = center - 0.5 - (width - 1.0) / 2.0, max(width - 1.0, 1e-6)
    return np.clip((arr - lo) / span, 0.0, 1.0)


def _to_unit(ds: pydicom.Dataset, arr: np.ndarray) -> np.ndarray:
    """Stored values -> display values in [0, 1] (0 = black), inverting MONOCHROME1."""
    arr = apply_modality_lut(arr, ds).astype(np.float32, copy=False)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if "VOILUTSequence" in ds:
        # LUT lookup wants integer inputs (the Modality LUT output is float even when it is identity)
        out = apply_voi_lut(np.rint(arr).astype(np.int64), ds, index=0, prefer_lut=True).astype(np.float32)
        lo, hi = float(out.min()), float(out.max())
        unit = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    elif center is not None and width is not None and width > 0:
        unit = _window(arr, center, width, str(ds.get("VOILUTFunction", "LINEAR")))
    else:
        # No VOI in the header: a robust full-range window (percentiles ignore a few hot pixels).
        sample = arr[:: max(1, arr.shape[0] // 256), :: max(1, arr.shape[1] // 256)]
        lo, hi = np.percentile(sample, [0.5, 99.5])
        if hi <= lo:  # (nearly) flat image: fall back to the full range
            lo, hi = float(arr.min()), float(arr.max())
        unit = np.clip((arr - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(arr)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1":
        unit = 1.0 - unit
    return unit.astype(np.float32, copy=False)


def fit_square(unit: np.ndarray, size: int) -> np.ndarray:
    """Resize to `size` rows keeping the aspect ratio, then center-pad (black) or crop width to `size`."""
    h, w = unit.shape
    new_w = max(1, round(w * size / h))
    # PIL's resampling widens the filter when shrinking, so large downscales are anti-aliased.
    img = Image.fromarray(unit.astype(np.float32), mode="F").resize((new_w, size), Image.BILINEAR)
    out8 = np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    canvas = np.zeros((size, size), dtype=np.uint8)
    if new_w >= size:
        x0 = (new_w - size) // 2
        canvas[:] = out8[:, x0 : x0 + size]
    else:
        x0 = (size - new_w) // 2
        canvas[:, x0 : x0 + new_w] = out8
    return canvas


def _j2k_header(cs: bytes) -> tuple[int, int, int, bool, int] | None:
    """(width, height, precision, signed, decomposition levels) from a raw J2K codestream's SIZ/COD."""
    if cs[:4] != b"\xff\x4f\xff\x51" or len(cs) < 45:
        return None  # not a bare codestream (a JP2 box wrapper, garbage): decode in full
    xsiz, ysiz, x0, y0 = struct.unpack(">4I", cs[8:24])
    if struct.unpack(">H", cs[40:42])[0] != 1:
        return None
    ssiz = cs[42]
    pos, levels = 2, None
    while pos + 4 <= len(cs) and levels is None:  # main-header markers up to the first tile (SOT)
        marker, length = struct.unpack(">HH", cs[pos:pos + 4])
        if marker == 0xFF90:
            break
        if marker == 0xFF52 and pos + 10 <= len(cs):
            levels = cs[pos + 9]  # COD: marker, Lcod, Scod, SGcod (4 bytes), then SPcod's level count
        pos += 2 + length
    if levels is None or x0 or y0:  # image offsets would change the reduced grid's rounding
        return None
    return xsiz, ysiz, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels


def j2k_decode(codestream: bytes, reduce: int = 0) -> np.ndarray:
    """Stored values (int32) of a grey J2K codestream decoded in memory, 2**reduce times smaller per side."""
    hdr = _j2k_header(codestream)
    if hdr is None:
        raise ValueError("not a single-component JPEG 2000 codestream")
    w, h, prec, signed, _ = hdr
    im = Image.open(io.BytesIO(codestream), formats=["JPEG2000"])
    if reduce:
        # Pillow's own `im.reduce = k` rounds the reduced size to nearest, not up as OpenJPEG does,
        # and then refuses the data for odd sizes (1841 columns at k=2): set the tile ourselves.
        t = im.tile[0]
        im._size = (-(-w // 2**reduce), -(-h // 2**reduce))
        im.tile = [ImageFile._Tile(t[0], (0, 0, *im.size), t[2], (t[3][0], reduce, 0, *t[3][3:]))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im.load()
    arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"unexpected decoded shape {arr.shape}")
    # Pillow widens samples to its 8/16-bit modes: shifted left to the top bit, signed ones offset to unsigned
    shift = (8 if arr.dtype == np.uint8 else 16) - prec
    out = (arr.astype(np.int32) >> shift) if shift > 0 else arr.astype(np.int32)
    if signed:
        out -= 1 << (prec - 1)
    return out


def _j2k_reduced(ds: pydicom.Dataset, image_size: int) -> np.ndarray | None:
    """Stored values of a single-frame grey JPEG 2000 image decoded in memory at the coarsest
    wavelet level whose short side still has >= image_size pixels (OpenJPEG skips the finer
    levels: 10x+ faster than a full decode of a CR); None when not applicable (other syntax,
    small image, colour, any decoder trouble: then the caller decodes in full).
    """
    if (str(ds.file_meta.get("TransferSyntaxUID", "")) not in J2K_SYNTAXES or int(ds.get("NumberOfFrames", 1) or 1) != 1
            or int(ds.get("SamplesPerPixel", 1)) != 1 or "PixelData" not in ds):
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        hdr = _j2k_header(frame)
        if hdr is None:
            return None
        w, h, prec, signed, levels = hdr
        if (h, w) != (int(ds.Rows), int(ds.Columns)) or prec > 16 or signed != (int(ds.get("PixelRepresentation", 0)) == 1):
            return None
        k = 0
        while k < levels and -(-min(w, h) // 2 ** (k + 1)) >= image_size:  # OpenJPEG's reduced size is ceil(n / 2^k)
            k += 1
        if k < 1:
            return None
        arr = j2k_decode(frame, k)
    except Exception:  # noqa: BLE001 - the full decode is the fallback
        return None
    return arr if arr.shape == (-(-h // 2**k), -(-w // 2**k)) else None


def preprocess_dataset(ds: pydicom.Dataset, image_size: int, reduced: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """A decoded dataset -> (uint8 image_size x image_size, original (rows, cols)).

    reduced: allow reduced-resolution JPEG 2000 decoding (same image within rounding).
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PreprocessError("no pixel data")
    arr = _j2k_reduced(ds, image_size) if reduced else None
    if arr is not None:
        unit = _to_unit(ds, arr)
        return fit_square(unit, image_size), (int(ds.Rows), int(ds.Columns))
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any codec failure means "cannot decode"
        raise PreprocessError(f"cannot decode pixel data ({ds.file_meta.get('TransferSyntaxUID', '?')}): {exc}") from exc
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]  # multi-frame radiographs: the first frame
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour: luminance
        if pi.startswith("YBR"):
            arr = arr[..., 0]
        else:
            arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        unit = arr.astype(np.float32)
        lo, hi = float(unit.min()), float(unit.max())
        unit = (unit - lo) / (hi - lo) if hi > lo else np.zeros_like(unit)
    elif arr.ndim == 2:
        unit = _to_unit(ds, arr)
    else:
        raise PreprocessError(f"unsupported pixel array shape {arr.shape}")
    if not np.isfinite(unit).all():
        unit = np.nan_to_num(unit, nan=0.0, posinf=1.0, neginf=0.0)
    return fit_square(unit, image_size), (int(arr.shape[0]), int(arr.shape[1]))


def preprocess_file(path: str | Path, image_size: int, reduced: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
    """Read and preprocess one DICOM file; PreprocessError when it cannot be used."""
    try:
        ds = pydicom.dcmread(str(path))
    except FileNotFoundError as exc:
        raise PreprocessError(f"file not found: {path}") from exc
    except Exception as exc:  # noqa: BLE001
        raise PreprocessError(f"not a readable DICOM file: {exc}") from exc
    return preprocess_dataset(ds, image_size, reduced)
