"""Classify DICOM files with a finished job's RUN_DIR/model.pt (same preprocessing and normalisation as
training and evaluation).

`Classifier` is the loaded model: the API's warm predictor process (`python -m models.predict_cli --serve`)
holds one, a scoring job (models.scoring) holds one on the worker's device. `predict_file` is the one-shot
form (cached per model file and mtime).
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from models.preprocess import preprocess_dataset, preprocess_file
from models.registry import build_model


def pick_device(pref: str = "auto") -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


class Classifier:
    """A model.pt loaded for inference: uint8 (N, S, S) images -> softmax probabilities (N, C)."""

    def __init__(self, model_path: str | Path, device: str | torch.device = "cpu") -> None:
        t0 = time.perf_counter()
        self.path = Path(model_path)
        ck = torch.load(str(self.path), map_location="cpu", weights_only=False)
        self.classes: list[str] = list(ck["classes"])
        self.image_size = int(ck["image_size"])
        self.mean, self.std = float(ck["normalize"]["mean"]), float(ck["normalize"]["std"])
        net = build_model(ck["arch"]["model"], len(self.classes), ck["arch"]["depth"])
        net.load_state_dict(ck["model"])
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.cuda = self.device.type == "cuda"
        net = net.to(self.device).eval()
        if self.cuda:  # as evaluation after training runs: channels_last, bf16 autocast
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.load_seconds = time.perf_counter() - t0

    def probabilities(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (N, S, S) -> float64 (N, C), rows summing to 1."""
        x = torch.as_tensor(images)
        if x.ndim == 2:
            x = x[None]
        x = x.to(self.device, non_blocking=True).unsqueeze(1).float().div_(255.0)
        x = (x - self.mean) / self.std
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            p = torch.softmax(self.net(x).float(), dim=1)
        return p.double().cpu().numpy()

    def answer(self, p: np.ndarray) -> dict:
        """One row of probabilities -> {"class", "confidence", "probabilities": {class: p}}."""
        k = int(np.argmax(p))
        return {"class": self.classes[k], "confidence": float(p[k]),
                "probabilities": {c: float(v) for c, v in zip(self.classes, p, strict=True)}}

    def predict_file(self, dicom_path: str | Path) -> dict:
        """PreprocessError when the file cannot be turned into an image."""
        img, _ = preprocess_file(dicom_path, self.image_size)
        return self.answer(self.probabilities(img)[0])

    def warm_up(self) -> None:
        """Pay the first-call costs (oneDNN/cuDNN set-up, pixel-handler imports) before the first request."""
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian

        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Rows = ds.Columns = 2 * self.image_size
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = (np.arange(ds.Rows * ds.Columns) % 4096).astype(np.uint16).tobytes()
        img, _ = preprocess_dataset(ds, self.image_size)
        for _ in range(2):
            self.probabilities(img)


@lru_cache(maxsize=4)
def _load(model_path: str, mtime: float) -> Classifier:  # noqa: ARG001 - mtime invalidates the cache
    return Classifier(model_path, "cpu")


def load_classifier(run_dir: str | Path) -> Classifier:
    model_path = Path(run_dir) / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"no model.pt in {run_dir}")
    return _load(str(model_path), model_path.stat().st_mtime)


def predict_file(run_dir: str | Path, dicom_path: str | Path) -> dict:
    """-> {"class", "confidence", "probabilities": {class: p}}; PreprocessError if the file is unusable."""
    return load_classifier(run_dir).predict_file(dicom_path)
