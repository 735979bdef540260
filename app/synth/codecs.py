"""Lossless encoders for the transfer syntaxes a real PACS holds, writing pixel data into a Dataset.

pydicom 3 encodes JPEG 2000 (pylibjpeg-openjpeg), JPEG-LS (pyjpegls) and RLE (pylibjpeg-rle);
JPEG lossless process 14 SV1 comes from imagecodecs (libjpeg-turbo, predictor 1), which pydicom
cannot encode. Every encoder is lossless: decoding gives back the array exactly.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "j2k": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
    "jpeg_sv1": JPEGLosslessSV1,
    "rle": RLELossless,
}


def set_pixels(ds: Dataset, arr: np.ndarray, syntax: str) -> None:
    """Store `arr` (uint16, BitsStored already set on `ds`) in `ds` under transfer syntax `syntax`.

    The file meta's TransferSyntaxUID is set to match.
    """
    uid = TRANSFER_SYNTAXES[syntax]
    if syntax == "explicit":
        ds.PixelData = np.ascontiguousarray(arr, dtype="<u2").tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = uid
    elif syntax == "jpeg_sv1":
        import imagecodecs

        frame = imagecodecs.jpeg8_encode(arr, lossless=True, predictor=1, bitspersample=int(ds.BitsStored))
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = uid
    else:
        plugin = {"j2k": "pylibjpeg", "jpegls": "pyjpegls", "rle": "pylibjpeg"}[syntax]
        # keep our deterministic SOPInstanceUID (pydicom would make a new random one)
        ds.compress(uid, arr, encoding_plugin=plugin, generate_instance_uid=False)
    # every encoder above is lossless
    ds.LossyImageCompression = "00"
