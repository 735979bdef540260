"""Thumbnails of indexed images: pixels only, downsampled, as PNG (no header, no burnt-in text kept
legible at this size is the caller's concern; nothing else of the file leaves it).

Used by the web console's index and training galleries (app.web). Made once per instance and size and
kept under DATA_DIR/cache/thumbnails; an image that cannot be decoded gets a grey placeholder.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import Instance
from app.store import validate_uid
from app.errors import NotFound

log = logging.getLogger("radcohort.thumbnails")

SIZES = (96, 160, 320)


def _placeholder(size: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), 200).save(buf, format="PNG")
    return buf.getvalue()


def _render(path: Path, size: int) -> bytes:
    from pydicom import dcmread

    ds = dcmread(path)
    a = ds.pixel_array
    if a.ndim == 4 or (a.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1):
        a = a[0]  # the first frame
    a = a.astype(np.float32)
    if a.ndim == 3:  # colour: luminance
        a = a[..., :3].mean(axis=2)
    lo, hi = np.percentile(a, [1, 99])
    a = np.clip((a - lo) / max(float(hi - lo), 1.0), 0, 1)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        a = 1 - a
    im = Image.fromarray((a * 255).astype(np.uint8), mode="L")
    im.thumbnail((size, size), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)  # a fresh image: no metadata of the file comes along
    return buf.getvalue()


def thumbnail_png(session: Session, settings: Settings, sop_instance_uid: str, size: int = 160) -> bytes:
    """A PNG of the instance's pixels at most `size` px on its longer side (404 when not indexed)."""
    validate_uid(sop_instance_uid)
    size = min(SIZES, key=lambda s: abs(s - size))
    rel = session.scalar(select(Instance.file_path).where(Instance.sop_instance_uid == sop_instance_uid))
    if rel is None:
        raise NotFound(f"instance {sop_instance_uid} not found")
    cached = settings.cache_dir / "thumbnails" / f"{sop_instance_uid}-{size}.png"
    if cached.is_file():
        return cached.read_bytes()
    try:
        data = _render(settings.store_dir / rel, size)
    except Exception as exc:  # noqa: BLE001 - an undecodable image still gets a (grey) thumbnail
        log.info("no thumbnail for an instance: %s", type(exc).__name__)
        return _placeholder(size)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(cached)
    return data
