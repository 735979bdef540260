"""Small inline SVG charts (bars, stacked bars, epoch curves): markup only, no script, no library."""

from __future__ import annotations

from markupsafe import Markup, escape

COLORS = {"train": "#3b6ea8", "val": "#8fb3dd", "test": "#e0a030", "loss": "#b03a2e", "train_accuracy": "#3b6ea8",
          "val_accuracy": "#2e8b57", "bar": "#3b6ea8"}


def hbars(rows: list[tuple[str, float, str]], width: int = 420, max_value: float | None = None,
          color: str = COLORS["bar"], title: str = "") -> Markup:
    """Horizontal bars: (label, value, text shown after the bar)."""
    if not rows:
        return Markup('<p class="muted">nothing to chart</p>')
    top = max_value if max_value else max((v for _, v, _ in rows), default=0) or 1
    label_w, text_w, h = 110, 90, 20
    bar_w = width - label_w - text_w
    out = [f'<svg class="chart" role="img" viewBox="0 0 {width} {h * len(rows) + 4}" width="{width}" '
           f'height="{h * len(rows) + 4}"><title>{escape(title)}</title>']
    for i, (label, value, text) in enumerate(rows):
        y = i * h + 2
        w = max(0.0, min(1.0, (value or 0) / top)) * bar_w
        out.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{escape(label)}</text>'
                   f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{h - 6}" fill="{color}"/>'
                   f'<text x="{label_w + w + 4:.1f}" y="{y + 14}">{escape(text)}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def stacked(rows: list[tuple[str, dict[str, float]]], keys: tuple[str, ...] = ("train", "val", "test"),
            width: int = 480, title: str = "") -> Markup:
    """Horizontal stacked bars (e.g. a cohort's train/val/test per class), with a legend."""
    if not rows:
        return Markup('<p class="muted">nothing to chart</p>')
    top = max((sum(parts.get(k, 0) or 0 for k in keys) for _, parts in rows), default=0) or 1
    label_w, text_w, h = 90, 60, 20
    bar_w = width - label_w - text_w
    height = h * len(rows) + 26
    out = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
           f'<title>{escape(title)}</title>']
    for i, (label, parts) in enumerate(rows):
        y = i * h + 2
        x = float(label_w)
        out.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{escape(label)}</text>')
        for k in keys:
            w = (parts.get(k, 0) or 0) / top * bar_w
            if w > 0:
                out.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{h - 6}" fill="{COLORS.get(k, "#888")}">'
                           f'<title>{escape(label)} {k}: {parts.get(k, 0)}</title></rect>')
            x += w
        total = sum(parts.get(k, 0) or 0 for k in keys)
        out.append(f'<text x="{x + 4:.1f}" y="{y + 14}">{total}</text>')
    ly = h * len(rows) + 18
    for j, k in enumerate(keys):
        lx = label_w + j * 80
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{COLORS.get(k, "#888")}"/>'
                   f'<text x="{lx + 16}" y="{ly}">{escape(k)}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def curves(history: list[dict], keys: tuple[str, ...], width: int = 520, height: int = 220, y_max: float | None = None,
           title: str = "", percent: bool = False) -> Markup:
    """Epoch curves: one polyline per key over history[i]['epoch'] (None values are gaps)."""
    pts = [(h.get("epoch"), {k: h.get(k) for k in keys}) for h in history if isinstance(h.get("epoch"), int)]
    if not pts:
        return Markup('<p class="muted">no epoch finished yet</p>')
    left, right, top, bottom = 46, 10, 10, 40
    xs = [e for e, _ in pts]
    x0, x1 = min(xs), max(xs)
    values = [v for _, d in pts for v in d.values() if isinstance(v, (int, float))]
    hi = y_max if y_max is not None else (max(values) if values else 1) or 1
    pw, ph = width - left - right, height - top - bottom

    def sx(e):
        return left + (0.5 if x1 == x0 else (e - x0) / (x1 - x0)) * pw

    def sy(v):
        return top + ph - max(0.0, min(1.0, v / hi)) * ph

    # data-points: the epochs drawn, for scripts and tests that follow a live chart
    out = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'data-points="{len(pts)}"><title>{escape(title)}</title>'
           f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#999"/>'
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#999"/>']
    for frac in (0, 0.5, 1):
        v = hi * frac
        label = f"{v:.0f}%" if percent else f"{v:.2g}"
        out.append(f'<text x="{left - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{label}</text>')
    out.append(f'<text x="{left}" y="{top + ph + 16}">epoch {x0}</text>'
               f'<text x="{left + pw}" y="{top + ph + 16}" text-anchor="end">{x1}</text>')
    for j, k in enumerate(keys):
        color = COLORS.get(k, "#555")
        seq = [(sx(e), sy(d[k])) for e, d in pts if isinstance(d.get(k), (int, float))]
        if len(seq) == 1:
            out.append(f'<circle cx="{seq[0][0]:.1f}" cy="{seq[0][1]:.1f}" r="3" fill="{color}"/>')
        elif seq:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                       + " ".join(f"{x:.1f},{y:.1f}" for x, y in seq) + '"/>')
        lx = left + j * 150
        out.append(f'<rect x="{lx}" y="{height - 14}" width="12" height="4" fill="{color}"/>'
                   f'<text x="{lx + 16}" y="{height - 8}">{escape(k.replace("_", " "))}</text>')
    out.append("</svg>")
    return Markup("".join(out))
