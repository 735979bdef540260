"""Classify one DICOM file with a finished job's RUN_DIR/model.pt (same preprocessing as training)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from models.preprocess import preprocess_file
from models.registry import build_model


@lru_cache(maxsize=4)
def _load(model_path: str, mtime: float):  # noqa: ARG001 - mtime invalidates the cache
    ck = torch.load(model_path, map_location="cpu", weights_only=False)
    net = build_model(ck["arch"]["model"], len(ck["classes"]), ck["arch"]["depth"])
    net.load_state_dict(ck["model"])
    net.eval()
    return net, ck


def predict_file(run_dir: str | Path, dicom_path: str | Path) -> dict:
    """-> {"class", "confidence", "probabilities": {class: p}}; PreprocessError if the file is unusable."""
    model_path = Path(run_dir) / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"no model.pt in {run_dir}")
    net, ck = _load(str(model_path), model_path.stat().st_mtime)
    img, _ = preprocess_file(dicom_path, ck["image_size"])
    x = torch.from_numpy(img).float().div_(255.0)[None, None]
    x = (x - ck["normalize"]["mean"]) / ck["normalize"]["std"]
    with torch.inference_mode():
        p = torch.softmax(net(x).float(), dim=1)[0].double().tolist()
    k = max(range(len(p)), key=p.__getitem__)
    return {"class": ck["classes"][k], "confidence": p[k], "probabilities": dict(zip(ck["classes"], p, strict=True))}
