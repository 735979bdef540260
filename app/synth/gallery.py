"""A gallery of phantoms: one small PNG strip per class plus a Markdown page with each image's header labels.

    .venv/bin/python -m app.synth.gallery docs [--per-class 4] [--seed 0]

Header labels go into the Markdown (not into the PNGs) so Japanese descriptions show as text.
Patient names and IDs are never shown.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread

from app.synth.generate import generate, read_truth
from app.synth.headers import TAXONOMIES

THUMB_H = 200


def _display(ds) -> Image.Image:
    """8-bit display: window from the tags when present, else 1-99 % stretch; MONOCHROME1 inverted."""
    a = ds.pixel_array.astype(np.float32)
    if "WindowCenter" in ds:
        c, w = float(ds.WindowCenter), float(ds.WindowWidth)
        lo, hi = c - w / 2, c + w / 2
    else:
        lo, hi = np.percentile(a, [1, 99])
    a = np.clip((a - lo) / max(hi - lo, 1.0), 0, 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        a = 1 - a
    im = Image.fromarray((a * 255).astype(np.uint8))
    return im.resize((max(1, round(im.width * THUMB_H / im.height)), THUMB_H), Image.LANCZOS)


def _labels(ds, row) -> str:
    def g(k):
        v = ds.get(k, None)
        return "—" if v is None else (str(v) or "(empty)")

    lat = " / ".join(f"{k}={ds.get(k)}" for k in ("Laterality", "ImageLaterality") if k in ds) or "no tag"
    return (f"{ds.Modality} {ds.Manufacturer}; BodyPartExamined={g('BodyPartExamined')}; "
            f"SeriesDescription={g('SeriesDescription')}; ViewPosition={g('ViewPosition')}; laterality {lat}; "
            f"PatientSex={g('PatientSex')}; PatientAge={g('PatientAge')}; {ds.PhotometricInterpretation}, "
            f"{ds.BitsStored} bits, {ds.Columns}x{ds.Rows}; header error: {row['header_error'] or 'none'}")


def make_gallery(docs_dir: str | Path, per_class: int = 4, seed: int = 0, header_error_rate: float = 0.15) -> Path:
    docs = Path(docs_dir)
    img_dir = docs / "gallery"
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Synthetic radiograph gallery", "",
             "Phantoms from `radcohort synth` (seed %d, size `scale:0.25`, header error rate %.2f), shown with"
             " the header labels each file carries. The true class comes from `truth.csv`, never from the headers."
             " Regenerate with `.venv/bin/python -m app.synth.gallery docs`." % (seed, header_error_rate), "",
             "```", "radcohort synth --per-class 100 --out /tmp/xr10 --seed 0 --taxonomy xr10 --header-error-rate 0.1",
             "radcohort synth --per-class 20 --out /tmp/small --size small      # 1/8 size, for tests and demos",
             "radcohort seed /tmp/xr10 --node my-pacs --associations 4          # or --host/--port/--aet",
             "radcohort seed /tmp/demo --synth --per-class 10 --size small --host 127.0.0.1 --port 4242 --aet ORTHANC",
             "```", "",
             "Each image is rendered from simple anatomy (ellipsoids, tubes and arcs with X-ray attenuation"
             " coefficients, exponentiated, with scatter, quantum noise, collimation, an L/R lead marker in most"
             " images and burned-in exposure text). Left and right limbs are mirror anatomy (fibula, radius and"
             " muscle bulk on the lateral/medial side). Chest age and sex cues (breast shadows, heart size, aortic"
             " knob calcification, bone density, spine curvature) are subtle on purpose.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for tax in ("xr10", "xr5"):
            out = Path(tmp) / tax
            generate(out, per_class, seed=seed, taxonomy=tax, header_error_rate=header_error_rate,
                     size="scale:0.25", workers=1)
            rows = read_truth(out)
            classes = TAXONOMIES[tax] if tax == "xr10" else ("H",)  # xr5 adds only the head PA class
            for cls in classes:
                picked = [r for r in rows if r["true_class"] == cls][:per_class]
                dss = [dcmread(out / r["file"]) for r in picked]
                thumbs = [_display(ds) for ds in dss]
                strip = Image.new("L", (sum(t.width for t in thumbs) + 4 * (len(thumbs) - 1), THUMB_H), 255)
                x = 0
                for t in thumbs:
                    strip.paste(t, (x, 0))
                    x += t.width + 4
                name = f"{cls}.png"
                strip.save(img_dir / name, optimize=True)
                lines += [f"## {cls}", "", f"![{cls}](gallery/{name})", ""]
                lines += [f"{k + 1}. {_labels(ds, r)}" for k, (ds, r) in enumerate(zip(dss, picked))]
                lines.append("")
    page = docs / "gallery.md"
    page.write_text("\n".join(lines), encoding="utf-8")
    return page


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("docs_dir", nargs="?", default="docs")
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make_gallery(a.docs_dir, a.per_class, a.seed))


if __name__ == "__main__":
    main()
