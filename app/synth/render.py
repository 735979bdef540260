"""Synthetic radiographs: simple anatomy as X-ray attenuation line integrals, exponentiated.

Each body region is a sum of analytic primitives (ellipsoids, superellipsoids, tapered tubes,
arcs) whose projected thickness times an attenuation coefficient gives the line integral A.
The detector sees exp(-A) plus a little scatter and records its log. Anatomy is rendered at low
resolution (it is smooth), rotated and shifted there, upsampled once to the detector size, and
quantum noise, collimation, the L/R lead marker and burned-in text are added at full resolution.

Coordinates are millimetres, origin at the field centre, x to the viewer's right, y downwards.
Images are displayed in anatomical position, so the patient's right is on the viewer's left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# xr10 classes and the extra head PA class of xr5
XR10 = ("W", "Ps", "LtE", "RtE", "LtK", "RtK", "C20F", "C20M", "C60F", "C60M")
XR5 = ("W", "H", "K", "E", "C")
REGIONS = ("waters", "sinus_pa", "head_pa", "elbow", "knee", "chest")

# attenuation coefficients per mm (effective, relative values matter after normalisation)
MU_SOFT = 0.020
MU_BONE = 0.055
MU_MARROW = 0.028
MU_AIR = -MU_SOFT  # air replacing soft tissue

# anatomy point (mm) at the field centre: Waters is centred on the maxillary sinuses, the
# Caldwell sinus view on the orbits, the head PA on the whole skull
CENTRE_MM = {"waters": (0.0, 22.0), "sinus_pa": (0.0, 0.0), "head_pa": (0.0, -22.0), "elbow": (0.0, 0.0),
             "knee": (0.0, 0.0), "chest": (0.0, 0.0)}

# field of view width in mm per region (height follows the detector aspect)
FOV_MM = {"waters": 215.0, "sinus_pa": 215.0, "head_pa": 270.0, "elbow": 220.0, "knee": 200.0,
          "chest": 365.0}


@dataclass
class Subject:
    """What is imaged: region plus the anatomy parameters that the class fixes or varies."""

    region: str
    side: str = ""  # "L"/"R" for elbow and knee
    sex: str = ""  # "F"/"M" (chest cues)
    age: int = 40
    size: float = 1.0  # patient size factor


@dataclass
class Acquisition:
    """How it is imaged: detector, positioning, exposure and presentation choices."""

    rows: int = 2500
    cols: int = 2048
    bits_stored: int = 12
    monochrome1: bool = False
    rotation_deg: float = 0.0
    shift_mm: tuple[float, float] = (0.0, 0.0)
    zoom: float = 1.0
    exposure: float = 1.0  # relative dose: sets quantum noise
    contrast: tuple[float, float] = (0.12, 0.85)  # display fraction of the in-field 1st/99.5th pct
    collimation: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # fraction cut l, t, r, b
    edge_enhance: float = 0.0  # unsharp-mask strength of the vendor's image processing
    marker: str = ""  # "L", "R" or "" (no lead marker)
    marker_corner: str = "tl"
    text: list[str] = field(default_factory=list)  # burned-in lines (never patient identity)


# ------------------------------------------------------------------------------------- canvas
class Canvas:
    """Accumulates attenuation line integrals on a low-resolution grid (mm coordinates)."""

    def __init__(self, width_mm: float, height_mm: float, px_per_mm: float):
        self.ppm = px_per_mm
        self.nx = max(8, int(round(width_mm * px_per_mm)))
        self.ny = max(8, int(round(height_mm * px_per_mm)))
        self.x = ((np.arange(self.nx, dtype=np.float32) + 0.5) / px_per_mm - width_mm / 2)
        self.y = ((np.arange(self.ny, dtype=np.float32) + 0.5) / px_per_mm - height_mm / 2)
        self.A = np.zeros((self.ny, self.nx), np.float32)

    def _box(self, cx: float, cy: float, rx: float, ry: float):
        """Slices of the grid that cover [cx-rx, cx+rx] x [cy-ry, cy+ry], with local coordinates."""
        x0 = self.x[0]
        y0 = self.y[0]
        i0 = max(0, int((cx - rx - x0) * self.ppm) - 1)
        i1 = min(self.nx, int((cx + rx - x0) * self.ppm) + 2)
        j0 = max(0, int((cy - ry - y0) * self.ppm) - 1)
        j1 = min(self.ny, int((cy + ry - y0) * self.ppm) + 2)
        if i0 >= i1 or j0 >= j1:
            return None
        return (slice(j0, j1), slice(i0, i1)), self.x[None, i0:i1] - cx, self.y[j0:j1, None] - cy

    def ellipsoid(self, cx, cy, a, b, mu, depth=None, angle=0.0, p=2.0, cut=None):
        """Projected (super)ellipsoid with semi-axes a, b (mm) and half-depth `depth`.

        `cut=(y0, h, half_width, soft)` fades the shape out below a dome y = y0 - h*(1-(x/hw)^2),
        which is how the diaphragm bounds the lungs.
        """
        r = max(a, b)
        box = self._box(cx, cy, r, r) if angle else self._box(cx, cy, a, b)
        if box is None:
            return
        sl, X, Y = box
        if angle:
            c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            X, Y = X * c + Y * s, Y * c - X * s
        if p == 2.0:
            q = (X / a) ** 2 + (Y / b) ** 2
        else:
            q = np.abs(X / a) ** p + np.abs(Y / b) ** p
        t = np.sqrt(np.clip(1.0 - q, 0.0, None))
        t *= 2.0 * (depth if depth is not None else min(a, b)) * mu
        if cut is not None:
            y0, h, hw, soft = cut
            dome = (y0 - cy) - h * (1.0 - np.clip((X / hw) ** 2, 0, 1))
            t *= np.clip((dome - Y) / soft, 0.0, 1.0)
        self.A[sl] += t

    def shell(self, cx, cy, a, b, thick, mu, depth=None, angle=0.0, p=2.0):
        """An ellipsoidal shell (e.g. the skull vault): outer minus inner."""
        d = depth if depth is not None else min(a, b)
        self.ellipsoid(cx, cy, a, b, mu, d, angle, p)
        self.ellipsoid(cx, cy, a - thick, b - thick, -mu, d - thick, angle, p)

    def tube(self, x0, y0, x1, y1, r0, r1, mu, cortex=0.0, mu_in=None, flat=False):
        """A tapered cylinder along a segment; with `cortex`, a bone with cortex and marrow.

        Ends are rounded (bone ends) unless `flat`: cut at the end points' y (limb soft tissue).
        """
        rmax = max(r0, r1)
        box = self._box((x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0) / 2 + rmax, abs(y1 - y0) / 2 + rmax)
        if box is None:
            return
        sl, X, Y = box
        X = X + (x1 - x0) / 2
        Y = Y + (y1 - y0) / 2
        dx, dy = x1 - x0, y1 - y0
        L2 = dx * dx + dy * dy or 1e-6
        t = np.clip((X * dx + Y * dy) / L2, 0.0, 1.0)
        d2 = (X - t * dx) ** 2 + (Y - t * dy) ** 2
        if flat:  # cut horizontally, so near-vertical limb segments join without a seam
            d2 = np.where((Y >= min(0.0, dy)) & (Y < max(0.0, dy)), d2, np.float32(1e9))
        r = r0 + (r1 - r0) * t
        outer = np.sqrt(np.clip(r * r - d2, 0.0, None))
        if cortex > 0:
            ri = np.clip(r - cortex, 0.1, None)
            inner = np.sqrt(np.clip(ri * ri - d2, 0.0, None))
            self.A[sl] += 2.0 * (mu * (outer - inner) + (mu_in if mu_in is not None else MU_MARROW) * inner)
        else:
            self.A[sl] += 2.0 * mu * outer

    def arc(self, cx, cy, R, th0, th1, r, mu, cortex=0.0):
        """A tube bent along a circular arc from angle th0 to th1 (degrees, y down), tapered ends."""
        lo, hi = min(th0, th1), max(th0, th1)
        ts = np.radians(np.linspace(lo, hi, 17))
        px, py = cx + R * np.cos(ts), cy + R * np.sin(ts)  # tight box around the arc only
        box = self._box((px.min() + px.max()) / 2, (py.min() + py.max()) / 2,
                        (px.max() - px.min()) / 2 + r, (py.max() - py.min()) / 2 + r)
        if box is None:
            return
        sl, X, Y = box
        X = X + ((px.min() + px.max()) / 2 - cx)
        Y = Y + ((py.min() + py.max()) / 2 - cy)
        rho = np.sqrt(X * X + Y * Y)
        d2 = (rho - R) ** 2
        ang = np.degrees(np.arctan2(Y, X))
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        da = np.abs((ang - mid + 180.0) % 360.0 - 180.0)
        w = np.clip((half - da) / max(half * 0.15, 1.0), 0.0, 1.0)
        outer = np.sqrt(np.clip(r * r - d2, 0.0, None))
        if cortex > 0:
            ri = max(r - cortex, 0.1)
            inner = np.sqrt(np.clip(ri * ri - d2, 0.0, None))
            self.A[sl] += 2.0 * w * (mu * (outer - inner) + MU_MARROW * inner)
        else:
            self.A[sl] += 2.0 * w * mu * outer


# ------------------------------------------------------------------------------------- anatomy
def _skull(cv: Canvas, rng: np.random.Generator, s: float, view: str) -> None:
    """Head: soft tissue, vault, orbits, sinuses, petrous ridges, mandible and teeth.

    view: "head_pa" (PA 0 deg: petrous ridges fill the orbits), "sinus_pa" (Caldwell: ridges in the
    lower third of the orbits) or "waters" (chin raised: ridges below the maxillary sinuses).
    """
    j = lambda k=1.0: 1.0 + k * rng.normal(0, 0.04)  # noqa: E731  small anatomical variation
    waters = view == "waters"
    vault_b = (78 if waters else 92) * s * j()
    vault_cy = (-40 if waters else -30) * s
    cv.ellipsoid(0, -5 * s, 84 * s * j(), 118 * s * j(), MU_SOFT, depth=80 * s)
    cv.shell(0, vault_cy, 74 * s * j(), vault_b, 6.5 * s, MU_BONE, depth=85 * s)
    # orbits: lucent with a dense rim
    oy = (-22 if waters else 0) * s
    ob = (13 if waters else 17) * s
    for sx in (-1, 1):
        ox = sx * 31 * s * j()
        cv.ellipsoid(ox, oy, 17 * s, ob, MU_AIR * 0.9, depth=18 * s)
        cv.shell(ox, oy, 19 * s, ob + 2 * s, 2.5 * s, MU_BONE * 0.8, depth=6 * s)
        # frontal sinus lobes above the orbits
        cv.ellipsoid(sx * 10 * s, oy - 30 * s, 10 * s * j(), 9 * s, MU_AIR * 0.8, depth=8 * s)
        # maxillary sinuses: larger and clearer in the Waters view
        my = (16 if waters else 38) * s
        mb = (30 if waters else 20) * s
        cv.ellipsoid(sx * 29 * s, my, (22 if waters else 19) * s * j(), mb, MU_AIR * 0.9,
                     depth=(22 if waters else 16) * s, p=2.6)
        cv.shell(sx * 29 * s, my, 21 * s, mb + 2 * s, 2 * s, MU_BONE * 0.5, depth=6 * s)
        # petrous ridges: dense bands slanting up towards the midline
        py = {"waters": 62, "sinus_pa": 9, "head_pa": 1}[view] * s + rng.normal(0, 2)
        cv.tube(sx * 70 * s, py + 12 * s, sx * 18 * s, py - 6 * s, 7 * s, 5 * s, MU_BONE * 1.3)
        # mandibular rami
        cv.tube(sx * 56 * s, (30 if waters else 35) * s, sx * 50 * s, 95 * s, 7 * s, 6 * s, MU_BONE,
                cortex=2.5 * s)
    # nasal cavity with septum
    cv.ellipsoid(0, (10 if waters else 22) * s, 10 * s, 28 * s, MU_AIR * 0.7, depth=20 * s)
    cv.tube(0, (-5 if waters else 5) * s, 0, (38 if waters else 45) * s, 1.5 * s, 1.5 * s, MU_BONE * 0.6)
    # mandible body (U) and teeth
    cv.arc(0, 45 * s, 54 * s, 15, 165, 6 * s, MU_BONE, cortex=2.5 * s)
    ty = (50 if waters else 62) * s
    for k in range(-6, 7):
        cv.ellipsoid(k * 6.5 * s, ty + 0.006 * (k * 6.5) ** 2 * s, 3 * s, 6 * s, MU_BONE * 1.4, depth=4 * s)
        cv.ellipsoid(k * 6.5 * s, ty + 16 * s + 0.006 * (k * 6.5) ** 2 * s, 3 * s, 6 * s, MU_BONE * 1.4,
                     depth=4 * s)
    if waters:
        # sphenoid sinus through the open mouth
        cv.ellipsoid(0, 40 * s, 12 * s, 8 * s, MU_AIR * 0.6, depth=10 * s)
    # cervical spine below the skull base
    cv.tube(0, 105 * s, 0, 170 * s, 13 * s, 13 * s, MU_BONE * 0.7, cortex=3 * s)


def _elbow(cv: Canvas, rng: np.random.Generator, s: float, side: str) -> None:
    """Elbow AP: distal humerus with epicondyles, trochlea and capitulum; radius laterally, ulna medially."""
    lat = -1.0 if side == "R" else 1.0  # lateral side on the viewer's left for a right elbow
    med = -lat
    j = lambda: 1.0 + rng.normal(0, 0.04)  # noqa: E731
    carry = math.radians(8 + rng.normal(0, 3))  # carrying angle: forearm deviates laterally
    fx = lambda y: lat * math.tan(carry) * max(y, 0.0)  # noqa: E731
    cv.tube(0, -200 * s, 0, -20 * s, 35 * s * j(), 39 * s, MU_SOFT, flat=True)
    cv.tube(0, -20 * s, fx(200 * s), 200 * s, 39 * s, 30 * s * j(), MU_SOFT, flat=True)
    # forearm extensor/brachioradialis bulk on the lateral side below the joint
    cv.ellipsoid(lat * 24 * s + fx(60 * s), 60 * s, 22 * s, 60 * s, MU_SOFT, depth=13 * s)
    # humerus shaft, distal flare, epicondyles, trochlea and capitulum
    cv.tube(0, -170 * s, 0, -45 * s, 11 * s * j(), 13 * s, MU_BONE, cortex=3.5 * s)
    cv.ellipsoid(0, -28 * s, 28 * s * j(), 15 * s, MU_BONE * 0.35, depth=10 * s, p=3.0)
    cv.ellipsoid(med * 34 * s, -25 * s, 11 * s, 9 * s, MU_BONE * 0.8, depth=8 * s)
    cv.ellipsoid(lat * 28 * s, -24 * s, 6 * s, 6 * s, MU_BONE * 0.7, depth=5 * s)
    cv.ellipsoid(med * 10 * s, -7 * s, 14 * s, 10 * s, MU_BONE * 0.7, depth=11 * s)
    cv.ellipsoid(lat * 14 * s, -7 * s, 11 * s, 9 * s, MU_BONE * 0.7, depth=10 * s)
    cv.ellipsoid(0, -27 * s, 9 * s, 8 * s, -MU_BONE * 0.35, depth=6 * s)  # olecranon fossa
    cv.ellipsoid(med * 4 * s, -15 * s, 12 * s, 13 * s, MU_BONE * 0.35, depth=10 * s)  # olecranon
    # radius (head, neck, shaft widening distally)
    rx = lat * 15 * s
    cv.ellipsoid(rx, 9 * s, 11 * s, 5 * s, MU_BONE * 0.8, depth=10 * s, p=3.0)
    cv.tube(rx, 14 * s, rx + fx(160 * s) + lat * 6 * s, 160 * s, 5.5 * s, 8.5 * s, MU_BONE, cortex=2.5 * s)
    # ulna (coronoid region, tapering shaft)
    ux = med * 7 * s
    cv.ellipsoid(ux, 6 * s, 13 * s, 10 * s, MU_BONE * 0.6, depth=10 * s)
    cv.tube(ux, 12 * s, ux + fx(160 * s) + med * 6 * s, 160 * s, 8 * s, 5.5 * s, MU_BONE, cortex=2.5 * s)


def _knee(cv: Canvas, rng: np.random.Generator, s: float, side: str) -> None:
    """Knee AP: femoral condyles, tibial plateau, patella, fibula on the lateral side."""
    lat = -1.0 if side == "R" else 1.0
    med = -lat
    j = lambda: 1.0 + rng.normal(0, 0.04)  # noqa: E731
    # the femoral shaft runs up and out towards the hip (anatomical valgus), the tibia straight down
    valg = math.tan(math.radians(6 + rng.normal(0, 1.5)))
    cv.tube(lat * valg * 170 * s, -220 * s, 0, 0, 62 * s * j(), 56 * s, MU_SOFT, flat=True)
    cv.tube(0, 0, 0, 220 * s, 56 * s, 44 * s * j(), MU_SOFT, flat=True)
    # vastus medialis bulk above the joint on the medial side, calf bulk below
    cv.ellipsoid(med * 45 * s, -70 * s, 30 * s, 70 * s, MU_SOFT, depth=22 * s)
    cv.ellipsoid(med * 28 * s, 110 * s, 28 * s, 70 * s, MU_SOFT * 0.7, depth=18 * s)
    # femur: shaft, metaphysis, condyles (medial larger, lower), notch
    cv.tube(lat * valg * 160 * s, -210 * s, 0, -50 * s, 14 * s * j(), 17 * s, MU_BONE, cortex=4.5 * s)
    cv.ellipsoid(0, -38 * s, 36 * s * j(), 22 * s, MU_BONE * 0.3, depth=22 * s, p=3.0)
    cv.ellipsoid(med * 22 * s, -11 * s, 24 * s, 20 * s, MU_BONE * 0.6, depth=27 * s)
    cv.ellipsoid(lat * 20 * s, -17 * s, 19 * s, 16 * s, MU_BONE * 0.6, depth=23 * s)
    cv.ellipsoid(0, -6 * s, 7 * s, 9 * s, -MU_BONE * 0.25, depth=10 * s)
    # patella superimposed on the distal femur
    cv.ellipsoid(lat * 3 * s, -32 * s, 20 * s * j(), 24 * s, MU_BONE * 0.3, depth=10 * s)
    # tibia: plateau, spines, metaphysis, shaft
    cv.ellipsoid(0, 12 * s, 41 * s * j(), 8 * s, MU_BONE * 0.6, depth=28 * s, p=4.0)
    cv.ellipsoid(-4 * s, 3 * s, 4 * s, 5 * s, MU_BONE * 0.5, depth=6 * s)
    cv.ellipsoid(4 * s, 3 * s, 4 * s, 5 * s, MU_BONE * 0.5, depth=6 * s)
    cv.ellipsoid(0, 32 * s, 32 * s, 20 * s, MU_BONE * 0.3, depth=20 * s, p=3.0)
    cv.tube(0, 30 * s, 0, 210 * s, 18 * s, 13 * s * j(), MU_BONE, cortex=4.5 * s)
    # fibula: head below the plateau, lateral
    fx = lat * 37 * s
    cv.ellipsoid(fx, 34 * s, 11 * s, 10 * s, MU_BONE * 0.8, depth=10 * s)
    cv.tube(fx, 36 * s, fx - lat * 3 * s, 210 * s, 7 * s, 6 * s, MU_BONE, cortex=2.5 * s)


def _chest(cv: Canvas, rng: np.random.Generator, s: float, sex: str, age: int) -> None:
    """Chest PA with subtle age and sex cues.

    Older: larger heart, calcified aortic knob, lower bone density, some spine curvature.
    Female: breast shadows over the lower lung fields, slightly narrower frame.
    Each cue is drawn from overlapping distributions on purpose.
    """
    old = float(np.clip((age - 20) / 45.0 + rng.normal(0, 0.25), 0.0, 1.3))
    fem = sex == "F"
    w = s * (0.93 if fem else 1.0) * (1.0 + rng.normal(0, 0.04))
    bone = MU_BONE * (1.0 - 0.18 * old + rng.normal(0, 0.04))
    j = lambda: 1.0 + rng.normal(0, 0.04)  # noqa: E731
    # trunk, neck, shoulders with humeral heads
    cv.ellipsoid(0, 40 * s, 165 * w, 280 * s, MU_SOFT, depth=105 * s, p=2.6)
    cv.tube(0, -260 * s, 0, -170 * s, 55 * w, 60 * w, MU_SOFT)
    for sx in (-1, 1):
        cv.ellipsoid(sx * 165 * w, -165 * s, 55 * w, 45 * s, MU_SOFT, depth=55 * s)
        cv.ellipsoid(sx * 168 * w, -150 * s, 24 * w, 25 * s, bone * 0.7, depth=24 * s)
    # lungs, bounded below by the diaphragm (right dome higher)
    for sx, dy in ((-1, -12), (1, 0)):
        dome_y = (115 + dy + rng.normal(0, 6)) * s
        cv.ellipsoid(sx * 78 * w, -5 * s, 68 * w * j(), 170 * s, MU_AIR * 0.85, depth=85 * s, p=2.2,
                     cut=(dome_y, 38 * s, 70 * w, 6 * s))
    # trachea
    cv.tube(0, -250 * s, 2 * s, -75 * s, 9 * s, 8 * s, MU_AIR * 0.8)
    # heart (patient's left = viewer's right) and aortic knob
    heart = (1.0 + 0.10 * old + rng.normal(0, 0.05)) * w
    cv.ellipsoid(22 * heart, 62 * s, 72 * heart, 60 * heart, MU_SOFT * 0.95, depth=62 * s, angle=-20)
    cv.tube(0, -80 * s, 0, 60 * s, 30 * s, 34 * s, MU_SOFT * 0.8)  # mediastinum
    kx, ky = 30 * w, -62 * s
    cv.ellipsoid(kx, ky, (14 + 5 * old) * s, 13 * s, MU_SOFT * 0.8, depth=15 * s)
    calc = old * rng.uniform(0.0, 1.4)
    if calc > 0.5:
        cv.arc(kx, ky, 12 * s, -80, 60, 1.4 * s, MU_BONE * 1.6 * min(calc, 1.2))
    # spine: vertebral bodies along a curve (scoliosis grows with age)
    amp = (2 + 8 * old * rng.uniform(0.3, 1.0)) * s * rng.choice([-1, 1])
    for k in range(14):
        vy = (-210 + k * 25) * s
        vx = amp * math.sin(math.pi * k / 13)
        cv.ellipsoid(vx, vy, 20 * s, 10 * s, bone * 0.45, depth=18 * s, p=4.0)
    # clavicles
    for sx in (-1, 1):
        cv.arc(sx * 60 * w, -90 * s, 120 * w, -125 if sx < 0 else -55, -75 if sx < 0 else -105, 7 * s, bone,
               cortex=2.2 * s)
    # posterior ribs: arcs from the spine, lateral then down; faint anterior ribs
    for sx in (-1, 1):
        for k in range(10):
            ry = (-185 + k * 27) * s + rng.normal(0, 1.5)
            R = (95 + 9 * k) * w
            # circle centred medially below the rib's top, arc from the spine outwards
            if sx < 0:
                cv.arc(-15 * w + R * 0.05, ry + R, R, -95, -185, 5.5 * s, bone, cortex=1.6 * s)
            else:
                cv.arc(15 * w - R * 0.05, ry + R, R, -85, 5, 5.5 * s, bone, cortex=1.6 * s)
            if k < 7:
                ay = ry + 60 * s
                cv.tube(sx * 150 * w, ay - 35 * s, sx * 45 * w, ay + 20 * s, 4 * s, 4 * s, bone * 0.35)
    # breast soft-tissue shadows
    if fem:
        for sx in (-1, 1):
            bsz = rng.uniform(0.6, 1.25)
            cv.ellipsoid(sx * 100 * w, 125 * s, 70 * w * bsz, 55 * s * bsz, MU_SOFT * 0.6, depth=22 * s * bsz)
    else:
        for sx in (-1, 1):  # pectoral muscle: faint, broad
            cv.ellipsoid(sx * 110 * w, -70 * s, 70 * w, 45 * s, MU_SOFT, depth=12 * s)
    # gastric air bubble under the left dome, sometimes
    if rng.random() < 0.5:
        cv.ellipsoid(70 * w, 160 * s, 28 * s, 16 * s, MU_AIR * 0.8, depth=20 * s)


def render_anatomy(subject: Subject, width_mm: float, height_mm: float, px_per_mm: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Line integral A (float32) of the subject on a grid of width_mm x height_mm."""
    cv = Canvas(width_mm, height_mm, px_per_mm)
    s = subject.size
    r = subject.region
    if r in ("waters", "sinus_pa", "head_pa"):
        _skull(cv, rng, s, r)
    elif r == "elbow":
        _elbow(cv, rng, s, subject.side)
    elif r == "knee":
        _knee(cv, rng, s, subject.side)
    elif r == "chest":
        _chest(cv, rng, s, subject.sex, subject.age)
    else:
        raise ValueError(f"unknown region {r!r}")
    return cv.A


# ------------------------------------------------------------------------------------- detector
def _box_blur(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window, edges replicated (separable running sums)."""
    p = np.pad(a, r, mode="edge").astype(np.float32)
    c = np.cumsum(p, axis=0)
    c = np.vstack([c[2 * r:2 * r + 1], c[2 * r + 1:] - c[:-2 * r - 1]])
    c = np.cumsum(c, axis=1)
    c = np.hstack([c[:, 2 * r:2 * r + 1], c[:, 2 * r + 1:] - c[:, :-2 * r - 1]])
    return c / np.float32((2 * r + 1) ** 2)


@lru_cache(maxsize=64)
def _glyph(text: str, px: int) -> np.ndarray:
    """A boolean mask of `text` at roughly `px` pixels tall (cached per process)."""
    font = ImageFont.load_default(size=max(6, px))
    l, t, r, b = font.getbbox(text)
    im = Image.new("L", (max(1, r - l + 2), max(1, b - t + 2)), 0)
    ImageDraw.Draw(im).text((-l + 1, -t + 1), text, fill=255, font=font)
    return np.asarray(im) > 127


class NoiseBank:
    """Unit Gaussian noise reused with random offsets: generating 5 M normals per image costs more
    than rendering it. Deterministic per size, so output does not depend on which worker ran."""

    def __init__(self, n: int, seed: int = 12345):
        self.data = np.random.default_rng(seed).standard_normal(n, dtype=np.float32)

    def take(self, rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
        n = rows * cols
        if n > self.data.size:
            self.data = np.random.default_rng(12345).standard_normal(n + n // 4, dtype=np.float32)
        off = int(rng.integers(0, self.data.size - n + 1))
        flat = self.data[off:off + n]
        return (flat if rng.random() < 0.5 else flat[::-1]).reshape(rows, cols)


_BANKS: dict[int, NoiseBank] = {}


def _bank(n: int) -> NoiseBank:
    key = 1 << max(16, (n - 1).bit_length())  # power-of-two sizes, so each worker holds few banks
    if key not in _BANKS:
        _BANKS[key] = NoiseBank(key + key // 8)
    return _BANKS[key]


def render(subject: Subject, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """One radiograph as stored pixel values (uint16, MONOCHROME1 already inverted)."""
    rows, cols = acq.rows, acq.cols
    fov_w = FOV_MM[subject.region] / acq.zoom
    fov_h = fov_w * rows / cols
    lr_rows = min(rows, 320)
    lr_cols = max(8, int(round(lr_rows * cols / rows)))
    ppm = lr_rows / fov_h
    margin = 1.35  # render beyond the field so rotation and shifts expose anatomy, not emptiness
    A = render_anatomy(subject, fov_w * margin, fov_h * margin, ppm, rng)

    # detector physics: transmitted intensity, a little scatter, log signal
    I = np.exp(-A)
    I += np.float32(rng.uniform(0.01, 0.04)) * float(I.mean())
    L = -np.log(I)

    # positioning: rotate/shift about the field centre, crop to the field (still low resolution)
    th = math.radians(acq.rotation_deg)
    c, s_ = math.cos(th), math.sin(th)
    cx_in, cy_in = L.shape[1] / 2, L.shape[0] / 2
    ox, oy = CENTRE_MM[subject.region]
    sx, sy = (acq.shift_mm[0] - ox) * ppm, (acq.shift_mm[1] - oy) * ppm
    # output pixel (u, v) -> input (x, y): rotate about the centre, then shift
    a, b = c, -s_
    d, e = s_, c
    u0, v0 = lr_cols / 2, lr_rows / 2
    coeffs = (a, b, cx_in - a * u0 - b * v0 - sx, d, e, cy_in - d * u0 - e * v0 - sy)
    Lf = float(np.percentile(L[::4, ::4], 2))  # outside the canvas: as thin as the thinnest body part
    low = Image.fromarray(L).transform((lr_cols, lr_rows), Image.AFFINE, coeffs, resample=Image.BILINEAR,
                                       fillcolor=Lf)

    # display scaling from the in-field histogram (what CR/DX "EDR" processing does)
    cl, ct, cr, cb = acq.collimation
    li0, li1 = int(cl * lr_cols), max(int(cl * lr_cols) + 2, int((1 - cr) * lr_cols))
    lj0, lj1 = int(ct * lr_rows), max(int(ct * lr_rows) + 2, int((1 - cb) * lr_rows))
    field_px = np.asarray(low)[lj0:lj1:3, li0:li1:3]
    p_lo, p_hi = np.percentile(field_px, [1.0, 99.5])
    maxval = (1 << acq.bits_stored) - 1
    lo, hi = acq.contrast
    gain = (hi - lo) * maxval / max(float(p_hi - p_lo), 1e-3)
    off = lo * maxval - gain * float(p_lo)

    # CR/DX frequency processing (unsharp mask) sharpens bone edges; scaling is linear, so both are
    # done at low resolution before the one full-size resample
    la = np.asarray(low)
    k = np.float32(acq.edge_enhance)
    if k > 0:
        la = la + k * (la - _box_blur(_box_blur(la, max(1, lr_rows // 60)), max(1, lr_rows // 60)))
    low = Image.fromarray(la * np.float32(gain) + np.float32(off))
    full = low if (lr_rows, lr_cols) == (rows, cols) else low.resize((cols, rows), Image.BICUBIC)
    base = np.asarray(full)
    # quantum noise: larger where fewer photons arrive (higher attenuation -> higher D)
    sd0 = maxval * 0.006 / math.sqrt(max(acq.exposure, 0.05))
    noise = _bank(rows * cols).take(rng, rows, cols)
    D = base * np.float32(sd0 * 1.5 / maxval)
    D += np.float32(sd0)
    D *= noise
    D += base

    # collimation: the shutters leave an unexposed (white) border with a little scatter
    j0, j1 = int(ct * rows), int((1 - cb) * rows)
    i0, i1 = int(cl * cols), int((1 - cr) * cols)
    unexposed = maxval * rng.uniform(0.9, 0.98)
    for sl in ((slice(0, j0), slice(None)), (slice(j1, None), slice(None)),
               (slice(j0, j1), slice(0, i0)), (slice(j0, j1), slice(i1, None))):
        blk = D[sl]
        if blk.size:
            blk *= 0.05
            blk += unexposed * 0.95

    # lead marker and burned-in text
    if acq.marker:
        _stamp(D, _glyph(acq.marker, max(8, rows // 14)), acq.marker_corner, (j0, j1, i0, i1),
               maxval * 0.97, rng)
    for k, line in enumerate(acq.text):
        g = _glyph(line, max(6, rows // 70))
        y = rows - (len(acq.text) - k) * int(g.shape[0] * 1.4) - rows // 60
        x = cols // 60
        if 0 <= y and y + g.shape[0] <= rows and x + g.shape[1] <= cols:
            D[y:y + g.shape[0], x:x + g.shape[1]][g] = maxval * 0.99

    np.clip(D, 0, maxval, out=D)
    if acq.monochrome1:
        np.subtract(maxval, D, out=D)
    return D.astype(np.uint16)


def _stamp(D: np.ndarray, mask: np.ndarray, corner: str, field_box, value: float, rng) -> None:
    """Put a lead letter inside the collimated field near a corner."""
    j0, j1, i0, i1 = field_box
    h, w = mask.shape
    pad = max(2, D.shape[0] // 50)
    y = j0 + pad if corner[0] == "t" else j1 - pad - h
    x = i0 + pad if corner[1] == "l" else i1 - pad - w
    if y < 0 or x < 0 or y + h > D.shape[0] or x + w > D.shape[1]:
        return
    D[y:y + h, x:x + w][mask] = value
