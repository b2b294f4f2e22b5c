"""Synthetic chest-like radiographs with planted findings and boxes, in the ChestX-ray14 layout.

Every image is drawn from a density map in patient ("anatomy") coordinates, x and y in [-1, 1],
x growing to the image right (the patient's left on a PA film), y growing downwards. The map is
the sum of an anatomy layer and one additive layer per planted finding, so a finding can be
switched off (`render_phantom(spec, size, omit=...)`) and its box is the footprint of its layer.
Acquisition (rotation, shift, zoom, brightness, contrast, gamma, noise, PA/AP) maps the density
to 8-bit pixels. Labels follow the long tail of the paper's Table 1.

A second site (`generate_second_site`) draws other patients with the same findings through another
scanner: brighter and flatter exposure, more noise, collimation borders, a side marker, mostly AP
portable films, written in the generic CSV layout (`labels.csv`) without labels for
SITE2_UNLABELLED, as an external test set.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.optimize import brentq
from tqdm import tqdm

from cxrdx import __version__
from cxrdx.atomic import write_text
from cxrdx.data.metadata import write_source_marker
from cxrdx.errors import CxrdxError
from cxrdx.findings import FINDINGS, format_labels

# The paper's Table 1, "Total" column: images with each finding, and with none, of 112,120.
TABLE1_COUNTS: dict[str, int] = {
    "Atelectasis": 11559,
    "Cardiomegaly": 2776,
    "Consolidation": 4667,
    "Edema": 2303,
    "Effusion": 13317,
    "Emphysema": 2516,
    "Fibrosis": 1686,
    "Hernia": 227,
    "Infiltration": 19894,
    "Mass": 5782,
    "Nodule": 6331,
    "Pleural_Thickening": 3385,
    "Pneumonia": 1431,
    "Pneumothorax": 5302,
}
TABLE1_IMAGES = 112120
TABLE1_NO_FINDING = 60361
PREVALENCE = np.array([TABLE1_COUNTS[name] / TABLE1_IMAGES for name in FINDINGS])
MAX_TAIL_FLOOR = 0.5
CARDIOMEGALY_CTR = (0.56, 0.66)  # normal hearts: 0.38-0.46, at most 0.49 magnified on AP films

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"

_PERSIST = 0.5  # chance a follow-up shows exactly the findings of the previous image (same lesions)
_FIELD_MM = 400.0  # width of the imaged field, for the pixel-spacing column
# A finding's box bounds the pixels where its layer reaches this part of its peak; emphysema's
# peak is where the lowered domes uncover lung, its darkening of the whole lungs is weaker.
_BOX_LEVEL = {"Emphysema": 0.1}
_EDGE = 0.012  # soft-edge width of anatomical outlines, anatomy units
_LUCENCY = 0.3  # how much darker aerated lung is than soft tissue
_BAND_PIXELS = 16384  # render in bands of rows this big: small temporaries are faster
_AP_SHARE = {1: 0.4, 2: 0.85}  # the second site films mostly portable AP
SITE2_UNLABELLED = ("Emphysema", "Fibrosis", "Hernia", "Pleural_Thickening")  # its reports do not say


@dataclass(frozen=True)
class PhantomSpec:
    """One phantom image: everything needed to render it and to write its metadata row."""

    image_index: str
    patient: int
    followup: int
    labels: tuple[int, ...]
    onset: tuple[int, ...]  # per finding: follow-up at which this lesion appeared (seeds its shape)
    view: str
    age: int
    gender: str
    seed: int
    site: int = 1  # 2: the second site's scanner (see _acquisition and _site_marks)


# --- labels and patients ---------------------------------------------------------------------


def target_prevalence(tail_floor: float = 0.0) -> np.ndarray:
    """Per-finding image prevalence: Table 1, each raised to at least `tail_floor`."""
    if not 0.0 <= tail_floor <= MAX_TAIL_FLOOR:
        raise CxrdxError(f"tail_floor must be between 0 and {MAX_TAIL_FLOOR}, got {tail_floor}")
    return np.maximum(PREVALENCE, tail_floor)


def _label_sampler(prevalence: np.ndarray) -> tuple[float, np.ndarray]:
    """Fraction of abnormal images and the per-finding rates that give exactly `prevalence`.

    An abnormal image draws each finding independently with rate c*p and redraws when it got
    none; then P(finding) = abnormal * c*p / (1 - prod(1 - c*p)), which equals p for the c found.
    """
    abnormal = max(1.0 - TABLE1_NO_FINDING / TABLE1_IMAGES, float(prevalence.max()))
    gap = lambda c: c * abnormal - (1.0 - np.prod(1.0 - c * prevalence))  # noqa: E731
    c = brentq(gap, 1e-12, 1.0 / prevalence.max())
    return abnormal, c * prevalence


def _draw_labels(rng: np.random.Generator, n: int, prevalence: np.ndarray) -> np.ndarray:
    abnormal, rates = _label_sampler(prevalence)
    labels = np.zeros((n, len(FINDINGS)), np.uint8)
    todo = np.flatnonzero(rng.random(n) < abnormal)
    while todo.size:
        labels[todo] = rng.random((todo.size, len(FINDINGS))) < rates
        todo = todo[labels[todo].sum(1) == 0]
    return labels


def sample_specs(n: int, seed: int = 0, tail_floor: float = 0.0, site: int = 1) -> list[PhantomSpec]:
    """The phantom dataset's rows (patients, follow-ups, labels, view) without rendering images."""
    if n < 1:
        raise CxrdxError(f"n must be at least 1, got {n}")
    if site not in _AP_SHARE:
        raise CxrdxError(f"site must be one of {', '.join(map(str, _AP_SHARE))}, got {site}")
    prevalence = target_prevalence(tail_floor)
    rng = np.random.default_rng([seed, 0] if site == 1 else [seed, 0, site])  # other patients at site 2
    visits: list[int] = []
    while len(visits) < n:
        visits.extend(range(min(int(rng.geometric(0.35)), 12)))
    visits = visits[:n]
    fresh = _draw_labels(rng, n, prevalence)
    copy = rng.random(n) < _PERSIST
    ap = rng.random(n) < _AP_SHARE[site]
    specs: list[PhantomSpec] = []
    patient, labels, onset, age, gender = 0, fresh[0], np.zeros(len(FINDINGS), int), 0, "M"
    for row, followup in enumerate(visits):
        if followup == 0:
            patient += 1
            age, gender = int(rng.integers(18, 86)), "M" if rng.random() < 0.56 else "F"
            labels, onset = fresh[row], np.zeros(len(FINDINGS), int)
        elif not copy[row]:
            labels, onset = fresh[row], np.full(len(FINDINGS), followup)
        specs.append(
            PhantomSpec(
                image_index=f"{patient:08d}_{followup:03d}.png",
                patient=patient,
                followup=followup,
                labels=tuple(int(v) for v in labels),
                onset=tuple(int(v) for v in onset),
                view="AP" if ap[row] else "PA",
                age=min(age + followup // 3, 95),
                gender=gender,
                seed=seed,
                site=site,
            )
        )
    return specs


def _rng(spec: PhantomSpec, *stream: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, spec.patient, *stream] + ([spec.site] if spec.site != 1 else []))


# --- anatomy -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    width: float  # |x| of the lateral lung borders
    medial: float  # |x| of the medial lung borders (mediastinum)
    apex: float  # y of the lung apices
    base: tuple[float, float]  # y of the costophrenic angles: image left, image right
    dome: float  # height of the diaphragm domes above the angles
    ctr: float  # cardiothoracic ratio
    heart_right: float  # x of the heart's image-left border
    heart_tilt: float
    heart_aspect: float
    hilum: float  # y of the hila
    clavicle: float  # y of the clavicles' sternal ends
    body: float  # soft tissue beyond the lateral lung borders
    neck: float  # half-width of the neck
    shoulders: float  # how far down the shoulders reach their full width
    breasts: bool
    gastric: float  # radius of the gastric bubble under the left dome; 0: not seen
    vessels: tuple[tuple[float, float, float], ...]  # (frequency, phase, curl) of lung markings;
    # the first entry's curl turns the right lung's pattern against the left one


def _anatomy(spec: PhantomSpec) -> _Anatomy:
    """The patient's anatomy (shared by all follow-ups), with this image's inspiration and view."""
    rng = _rng(spec, 0)
    u = rng.uniform
    base = u(0.45, 0.58)
    anatomy = _Anatomy(
        width=u(0.70, 0.80),
        medial=u(0.09, 0.13),
        apex=u(-0.74, -0.64),
        base=(base - u(0.02, 0.06), base),
        dome=u(0.11, 0.17),
        ctr=u(0.38, 0.46),
        heart_right=-u(0.12, 0.19),
        heart_tilt=u(0.25, 0.5),
        heart_aspect=u(0.66, 0.78),
        hilum=u(-0.18, -0.08),
        clavicle=u(-0.68, -0.6),
        body=u(0.1, 0.2),
        neck=u(0.17, 0.24),
        shoulders=u(0.45, 0.65),
        breasts=spec.gender == "F",
        gastric=u(0.04, 0.08) if rng.random() < 0.6 else 0.0,
        vessels=tuple((u(14, 30), u(0, 2 * math.pi), u(-6, 6)) for _ in range(4)),
    )
    visit = _rng(spec, 1, spec.followup)
    breath = visit.uniform(-0.03, 0.03) - (0.05 if spec.view == "AP" else 0.0)
    anatomy = replace(anatomy, base=(anatomy.base[0] + breath, anatomy.base[1] + breath))
    if spec.view == "AP":  # magnified heart, higher clavicles
        anatomy = replace(anatomy, ctr=anatomy.ctr * 1.06, clavicle=anatomy.clavicle - 0.05)
    return anatomy


def _ramp(margin: np.ndarray, width: float = _EDGE) -> np.ndarray:
    """0 outside, 1 inside, a linear edge `width` wide around margin == 0."""
    return np.clip(margin / width + 0.5, 0.0, 1.0)


def _norm(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    return np.sqrt(dx * dx + dy * dy)


def _dome_y(a: _Anatomy, q: np.ndarray, base: float | np.ndarray, dome: float) -> np.ndarray:
    peak = a.medial + 0.45 * (a.width - a.medial)
    scale = np.where(q > peak, np.float32(a.width - peak), np.float32(peak - a.medial + 0.3))
    return base - dome * np.clip(1.0 - ((q - peak) / scale) ** 2, 0.0, 1.0)


def _lungs(a: _Anatomy, X: np.ndarray, Y: np.ndarray, drop: float = 0.0, dome: float = 1.0):
    """Soft mask of both lungs and the depth below the lateral/apical chest wall.

    `drop` lowers the costophrenic angles and `dome` scales the height of the diaphragm domes.
    """
    q = np.abs(X)
    base = np.where(X < 0, np.float32(a.base[0] + drop), np.float32(a.base[1] + drop))
    tau = np.clip((Y - a.apex) / (base - a.apex), 0.0, 1.0)
    centre = 0.5 * (a.medial + a.width)
    wall = np.minimum(a.width - 0.3 * (1.0 - tau) ** 2 - q, Y - a.apex - 2.2 * (q - centre) ** 2)
    margin = np.minimum(np.minimum(wall, q - a.medial), _dome_y(a, q, base, a.dome * dome) - Y)
    return _ramp(margin), wall


def _heart_geometry(a: _Anatomy, ctr: float) -> tuple[float, float, float, float]:
    """Centre x, centre y and semi-axes of the heart ellipse with this cardiothoracic ratio."""
    cos, sin = math.cos(a.heart_tilt), math.sin(a.heart_tilt)
    half = ctr * a.width  # half of the heart's horizontal extent
    major = half / math.sqrt(cos**2 + (a.heart_aspect * sin) ** 2)
    minor = a.heart_aspect * major
    drop = math.sqrt((major * sin) ** 2 + (minor * cos) ** 2)
    right = a.heart_right - 0.3 * max(half - a.ctr * a.width, 0.0)
    base = 0.5 * (a.base[0] + a.base[1])
    return right + half, base - a.dome - 0.7 * drop, major, minor


def _heart(a: _Anatomy, X: np.ndarray, Y: np.ndarray, ctr: float) -> np.ndarray:
    cx, cy, major, minor = _heart_geometry(a, ctr)
    cos, sin = math.cos(a.heart_tilt), math.sin(a.heart_tilt)
    dx, dy = X - cx, Y - cy
    r = np.sqrt(((cos * dx + sin * dy) / major) ** 2 + ((cos * dy - sin * dx) / minor) ** 2)
    return _ramp((1.0 - r) * minor)


def _blob(X: np.ndarray, Y: np.ndarray, cx: float, cy: float, radius: float) -> np.ndarray:
    """Projected thickness of a sphere: 1 at the centre, 0 at and beyond `radius`."""
    return np.sqrt(np.clip(1.0 - ((X - cx) ** 2 + (Y - cy) ** 2) / radius**2, 0.0, 1.0))


def _segment(X: np.ndarray, Y: np.ndarray, p: tuple[float, float], angle: float, length: float):
    """Coordinates along (u, from 0 to `length`) and across (v) a segment starting at `p`."""
    cos, sin = math.cos(angle), math.sin(angle)
    dx, dy = X - p[0], Y - p[1]
    return cos * dx + sin * dy, cos * dy - sin * dx


@dataclass
class _Canvas:
    """The anatomy of one image on its pixel grid; findings draw their layers from it."""

    X: np.ndarray
    Y: np.ndarray
    anatomy: _Anatomy
    lungs: dict[int, np.ndarray]  # side (-1: image left, 1: image right) -> soft lung mask
    lung: np.ndarray  # both lungs
    wall: np.ndarray  # depth below the lateral/apical chest wall
    heart: np.ndarray
    visible: np.ndarray  # aerated lung not hidden by heart or mediastinum
    markings: np.ndarray  # vessel density inside the visible lung
    air: np.ndarray  # how much the visible lung darkens the image; what an opacity can fill
    density: np.ndarray  # the anatomy layer

    def lung_point(self, rng: np.random.Generator, side: int, tau: tuple[float, float], lateral: tuple[float, float]):
        """A point inside one lung: vertical fraction apex->angle, horizontal fraction medial->wall."""
        a = self.anatomy
        t = rng.uniform(*tau)
        y = a.apex + t * (a.base[(side + 1) // 2] - a.dome * 0.6 - a.apex)
        inner = a.medial + 0.08
        if t > 0.45:  # keep off the heart, which hides the medial lower lung
            inner = max(inner, side * _heart_geometry(a, a.ctr)[0] + a.ctr * a.width + 0.04)
        outer = a.width - 0.3 * (1 - t) ** 2 - 0.06
        f = rng.uniform(*lateral)
        return side * (inner + f * max(outer - inner, 0.05)), y

    def noise(self, rng: np.random.Generator, cells: float, waves: int = 10) -> np.ndarray:
        """Smooth noise in [0, 1], about `cells` blobs across the body, fixed to the anatomy."""
        angle, phase = rng.uniform(0, math.pi, waves).tolist(), rng.uniform(0, 2 * math.pi, waves).tolist()
        k = (rng.uniform(0.7, 1.3, waves) * (math.pi * cells / 2)).tolist()
        field = sum(np.cos(self.X * (f * math.cos(t)) + self.Y * (f * math.sin(t)) + p) for f, t, p in zip(k, angle, phase))
        return np.clip(0.5 + field * (0.5 / math.sqrt(waves / 2)), 0.0, 1.0)


def _canvas(a: _Anatomy, X: np.ndarray, Y: np.ndarray) -> _Canvas:
    absx = np.abs(X)
    lung, wall = _lungs(a, X, Y)
    left = lung * (X < 0)
    lungs = {-1: left, 1: lung - left}
    heart = _heart(a, X, Y, a.ctr)
    knob = _ramp(0.075 - _norm(X - a.medial + 0.01, Y - a.hilum + 0.22))
    visible = lung * (1.0 - np.maximum(heart, knob))

    # Soft tissue thickest in the middle; neck and shoulders at the top.
    rise = np.clip((Y + 1.05) / a.shoulders, 0.0, 1.0)
    half = a.neck + (a.width + a.body - a.neck) * rise * rise * (3.0 - 2.0 * rise)
    body = _ramp(half - absx, 0.03) * (0.55 + 0.45 * np.sqrt(np.clip(1.0 - (X / half) ** 2, 0.0, 1.0)))
    density = 0.5 * body
    if a.breasts:
        density += 0.06 * np.exp(((absx - 0.5) ** 2 + (Y - a.base[0] + 0.05) ** 2) * (-1 / 0.06))
    if a.gastric:
        density -= 0.2 * _blob(X, Y, 0.4, a.base[1] - a.dome + a.gastric + 0.03, a.gastric) ** 0.3

    # Bones: spine, clavicles, ribs of the thoracic cage.
    density += 0.1 * _ramp(0.055 - absx) * (0.85 + 0.15 * np.cos(Y * (2 * math.pi / 0.09)))
    clav = a.clavicle - 0.18 * (absx - 0.08) + 0.1 * (absx - 0.08) ** 2
    density += 0.12 * _ramp(0.028 - np.abs(Y - clav)) * _ramp(absx - 0.07) * _ramp(0.62 - absx, 0.05)
    dome = _dome_y(a, absx, 0.5 * (a.base[0] + a.base[1]), a.dome)
    cage = _ramp(a.width + 0.06 - absx, 0.04) * _ramp(Y - a.apex + 0.1, 0.08) * _ramp(dome + 0.04 - Y, 0.04)
    rib = np.cos((Y + 0.2 * absx - 0.7 * absx**2) * (2 * math.pi / 0.12))
    density += 0.05 * cage * (1.0 - 0.7 * heart) * _ramp(absx - a.medial, 0.08) * np.clip((rib - 0.2) * 2.5, 0.0, 1.0)

    # Aerated lungs with vessels radiating from the hila; the trachea.
    dx, dy = absx - (a.medial + 0.1), Y - a.hilum
    theta, r = np.arctan2(dy, dx) + np.sign(X) * a.vessels[0][2], _norm(dx, dy)
    waves = sum(np.cos(f * theta + phase + curl * r) for f, phase, curl in a.vessels[1:])
    vessels = np.clip(waves - 0.9, 0.0, 2.0) * (0.6 + 0.4 * np.cos(r * 25.0))
    markings = lung * (0.08 * vessels * np.exp(r * (-1 / 0.45)) + 0.12 * np.exp((r * r) * (-1 / 0.09**2)))
    air = visible * (_LUCENCY - markings)
    density -= air
    density -= 0.14 * _ramp(0.032 - absx) * _ramp(a.hilum - 0.05 - Y, 0.04)
    return _Canvas(X, Y, a, lungs, lung, wall, heart, visible, markings * visible, air, density)


# --- findings: each returns its additive density layer ----------------------------------------


def _side(rng: np.random.Generator) -> int:
    return 1 if rng.random() < 0.5 else -1


def _nodule(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Small dense sphere (~3-4 % of the field) in either lung."""
    x, y = cv.lung_point(rng, _side(rng), (0.12, 0.85), (0.15, 0.85))
    return rng.uniform(0.18, 0.32) * _blob(cv.X, cv.Y, x, y, rng.uniform(0.045, 0.07)) ** 0.5


def _mass(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Large lobulated dense blob: a sphere with 3-5 overlapping lobes."""
    x, y = cv.lung_point(rng, _side(rng), (0.2, 0.75), (0.25, 0.7))
    radius = rng.uniform(0.1, 0.16)
    lobes = [_blob(cv.X, cv.Y, x, y, radius)]
    for angle in rng.uniform(0, 2 * math.pi, rng.integers(3, 6)):
        r = radius * rng.uniform(0.4, 0.6)
        cx, cy = x + r * math.cos(angle), y + r * math.sin(angle)
        lobes.append(_blob(cv.X, cv.Y, cx, cy, radius * rng.uniform(0.5, 0.7)))
    return rng.uniform(0.2, 0.32) * np.maximum.reduce(lobes) ** 0.4


def _effusion(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Fluid at one or both bases: opacity under a meniscus rising to the wall, blunting the angle."""
    a = cv.anatomy
    sides = (-1, 1) if rng.random() < 0.3 else (_side(rng),)
    layer = np.zeros_like(cv.X)
    for side in sides:
        base = a.base[(side + 1) // 2]
        depth = rng.uniform(0.2, 0.45) * (base - a.apex)  # fluid height at the chest wall
        q = side * cv.X
        rise = np.clip((q - a.medial) / (a.width - a.medial), 0.0, 1.0) ** 2
        level = base - a.dome - 0.2 * depth + (a.dome + 0.2 * depth - depth) * rise  # meniscus
        fill = _ramp(cv.Y - level, 0.05) * (0.75 + 0.25 * _ramp(cv.Y - level - 0.08, 0.1))
        layer += rng.uniform(0.75, 1.0) * fill * cv.air * (cv.X * side > 0)
    return layer


def _pneumothorax(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Apical-lateral rim of air without lung markings, bounded by a thin visceral pleural line."""
    a = cv.anatomy
    side = _side(rng)
    tau = np.clip((cv.Y - a.apex) / (a.base[(side + 1) // 2] - a.apex), 0.0, 1.0)
    rim = rng.uniform(0.07, 0.16) * np.clip(1.0 - tau / rng.uniform(0.55, 0.9), 0.0, 1.0) ** 0.6
    wall, lung = cv.wall, cv.lungs[side]
    air = _ramp(rim - wall, 0.008) * lung
    line = _ramp(0.009 - np.abs(wall - rim), 0.006) * lung * (rim > 0.02)
    return -air * (cv.markings + rng.uniform(0.06, 0.1)) + 0.14 * line


def _cardiomegaly(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """The heart widened to a cardiothoracic ratio in CARDIOMEGALY_CTR."""
    a = cv.anatomy
    ctr = rng.uniform(*CARDIOMEGALY_CTR)
    big = _heart(a, cv.X, cv.Y, ctr) * (cv.Y < 0.5 * (a.base[0] + a.base[1]) + 0.02)
    return np.clip(big - cv.heart, 0.0, 1.0) / np.maximum(1.0 - cv.heart, 1e-3) * cv.air


def _hernia(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Retrocardiac round sac with a dense wall and a gas bubble above an air-fluid level."""
    a = cv.anatomy
    cx, cy, _, _ = _heart_geometry(a, a.ctr)
    x, y = cx - rng.uniform(0.05, 0.15), cy + rng.uniform(-0.02, 0.1)
    radius = rng.uniform(0.07, 0.11)
    sac = _blob(cv.X, cv.Y, x, y, radius)
    wall = _ramp(0.015 - np.abs(_norm(cv.X - x, cv.Y - y) - radius * 0.92), 0.01)
    gas = _ramp(y + rng.uniform(-0.2, 0.3) * radius - cv.Y, 0.006) * _ramp(sac - 0.35, 0.1)
    return rng.uniform(0.8, 1.0) * (0.08 * (sac > 0).astype(np.float32) + 0.08 * wall - 0.28 * gas)


def _atelectasis(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Plate-like band in a lower zone, or a wedge from the pleura pointing to the hilum."""
    side = _side(rng)
    if rng.random() < 0.5:  # plate-like band
        x, y = cv.lung_point(rng, side, (0.55, 0.85), (0.3, 0.7))
        length, thick = rng.uniform(0.2, 0.34), rng.uniform(0.03, 0.05)
        u, v = _segment(cv.X, cv.Y, (x, y), rng.uniform(-0.35, 0.35), 1.0)
        shape = _ramp(thick / 2 - np.abs(v), 0.01) * _ramp(length / 2 - np.abs(u), 0.04)
    else:  # wedge from the pleura towards the hilum
        x, y = cv.lung_point(rng, side, (0.45, 0.85), (0.95, 1.0))
        a = cv.anatomy
        angle = math.atan2(a.hilum - y, side * (a.medial + 0.1) - x)
        length, half = rng.uniform(0.25, 0.4), rng.uniform(0.05, 0.09)
        u, v = _segment(cv.X, cv.Y, (x + 0.06 * side, y), angle, length)
        shape = _ramp(u, 0.02) * _ramp(half * (1.0 - u / length) - np.abs(v), 0.01)
    return rng.uniform(0.2, 0.3) * shape * cv.lungs[side]


def _consolidation(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Dense, fairly homogeneous patch with dark branching air bronchograms."""
    side = _side(rng)
    x, y = cv.lung_point(rng, side, (0.3, 0.85), (0.25, 0.75))
    radius = rng.uniform(0.1, 0.15)
    field = np.zeros_like(cv.X)
    for _ in range(int(rng.integers(3, 6))):
        bx, by = x + rng.normal(0, radius * 0.35), y + rng.normal(0, radius * 0.35)
        r = radius * rng.uniform(0.5, 0.8)
        field = np.maximum(field, np.exp(-((((cv.X - bx) ** 2 + (cv.Y - by) ** 2) / r**2) ** 2)))
    a = cv.anatomy
    toward = math.atan2(a.hilum - y, side * (a.medial + 0.1) - x)
    bronchi = np.zeros_like(cv.X)
    for angle in toward + rng.uniform(-0.5, 0.5, 3):
        u, v = _segment(cv.X, cv.Y, (x, y), angle + math.pi, radius)
        tube = _ramp(0.008 - np.abs(v), 0.006) * _ramp(u + radius * 0.6, 0.02) * _ramp(radius * 0.8 - u, 0.02)
        bronchi = np.maximum(bronchi, tube)
    return rng.uniform(0.26, 0.36) * field * (1.0 - 0.6 * bronchi) * (0.3 + 0.7 * cv.lungs[side])


def _pneumonia(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Lobar, mottled opacity: upper lobe cut sharply at the horizontal fissure, or a lower lobe."""
    a = cv.anatomy
    side = _side(rng)
    fissure = a.hilum + rng.uniform(-0.04, 0.06)
    if side < 0 and rng.random() < 0.5:  # right upper lobe, sharp lower edge at the horizontal fissure
        lobe = _ramp(fissure - cv.Y, 0.008) * _ramp(cv.Y - a.apex - 0.1, 0.15)
    else:  # lower lobe: hazy upper edge, fills the base and hides the dome
        slope = rng.uniform(-0.15, 0.15)
        lobe = _ramp(cv.Y - fissure - 0.08 - slope * side * cv.X, 0.07)
    mottle = 0.55 + 0.45 * cv.noise(rng, 14)
    return rng.uniform(0.2, 0.28) * lobe * mottle * cv.lungs[side] * (1.0 - cv.heart)


def _infiltration(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Faint, patchy, ill-defined haze over a zone of one or both lungs."""
    a = cv.anatomy
    sides = (-1, 1) if rng.random() < 0.5 else (_side(rng),)
    centre = a.apex + rng.uniform(0.35, 0.75) * (a.base[0] - a.apex)
    zone = np.exp(-(((cv.Y - centre) / rng.uniform(0.25, 0.4)) ** 2))
    patches = np.clip(cv.noise(rng, 9) * 1.6 - 0.5, 0.0, 1.0)
    lungs = sum(cv.lungs[s] for s in sides)
    return rng.uniform(0.12, 0.18) * zone * patches * lungs * (1.0 - cv.heart)


def _edema(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Bilateral perihilar (bat-wing) haze, with Kerley B lines at the lateral bases."""
    a = cv.anatomy
    spread = rng.uniform(0.22, 0.3)
    wing = np.exp(-(((np.abs(cv.X) - a.medial - 0.12) / spread) ** 2) - ((cv.Y - a.hilum - 0.05) / (1.3 * spread)) ** 2)
    layer = rng.uniform(0.14, 0.2) * wing * cv.lung * (1.0 - cv.heart)
    # Kerley B lines: short horizontal lines at the lateral bases.
    lines = _ramp(0.006 - np.abs((cv.Y - rng.uniform(0, 1)) % 0.045 - 0.0225), 0.006)
    basal = _ramp(cv.Y - (a.hilum + 0.25), 0.05)
    for side in (-1, 1):
        layer += 0.1 * lines * basal * _ramp(0.07 - cv.wall, 0.01) * cv.lungs[side]
    return layer


def _emphysema(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Hyperlucent, over-expanded lungs: lower, flatter domes and sparse vessel markings."""
    a = cv.anatomy
    drop, flat = rng.uniform(0.03, 0.08), rng.uniform(0.3, 0.6)
    darker = rng.uniform(0.04, 0.08)
    big, _ = _lungs(a, cv.X, cv.Y, drop, flat)
    extra = np.clip(big - cv.lung, 0.0, 1.0)
    return -(extra * _LUCENCY + big * darker) * (1.0 - cv.heart) - 0.6 * cv.markings


def _fibrosis(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Irregular reticular net in the peripheral upper zones."""
    a = cv.anatomy
    cell = rng.uniform(0.06, 0.085)
    angle = rng.uniform(0, math.pi)
    u = (cv.X * math.cos(angle) + cv.Y * math.sin(angle) + cv.noise(rng, 8) * cell * 3) * (math.pi / cell)
    v = (cv.Y * math.cos(angle) - cv.X * math.sin(angle) + cv.noise(rng, 8) * cell * 3) * (math.pi / cell)
    net = _ramp(0.3 - np.minimum(np.abs(np.sin(u)), np.abs(np.sin(v))), 0.2) * (0.4 + 0.6 * cv.noise(rng, 10))
    sides = (-1, 1) if rng.random() < 0.6 else (_side(rng),)
    upper = _ramp(a.hilum + rng.uniform(0.05, 0.2) - cv.Y, 0.15)
    layer = np.zeros_like(cv.X)
    for side in sides:
        layer += _ramp(rng.uniform(0.18, 0.28) - cv.wall, 0.08) * cv.lungs[side]
    return rng.uniform(0.13, 0.19) * net * upper * layer


def _pleural_thickening(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Band of soft tissue along a stretch of the lateral or apical chest wall."""
    a = cv.anatomy
    sides = (-1, 1) if rng.random() < 0.3 else (_side(rng),)
    layer = np.zeros_like(cv.X)
    for side in sides:
        tau = (cv.Y - a.apex) / (a.base[(side + 1) // 2] - a.apex)
        start = rng.uniform(0.0, 0.35)
        span = _ramp(tau - start, 0.1) * _ramp(start + rng.uniform(0.3, 0.5) - tau, 0.1)
        thick = rng.uniform(0.05, 0.08) * (1.0 + 0.35 * np.sin(tau * rng.uniform(15, 30) + rng.uniform(0, 6)))
        layer += _ramp(thick - cv.wall, 0.01) * span * (cv.X * side > 0)
    return rng.uniform(0.75, 1.0) * layer * cv.air


FindingPainter = Callable[[_Canvas, np.random.Generator], np.ndarray]
PAINTERS: dict[str, FindingPainter] = {
    "Atelectasis": _atelectasis,
    "Cardiomegaly": _cardiomegaly,
    "Consolidation": _consolidation,
    "Edema": _edema,
    "Effusion": _effusion,
    "Emphysema": _emphysema,
    "Fibrosis": _fibrosis,
    "Hernia": _hernia,
    "Infiltration": _infiltration,
    "Mass": _mass,
    "Nodule": _nodule,
    "Pleural_Thickening": _pleural_thickening,
    "Pneumonia": _pneumonia,
    "Pneumothorax": _pneumothorax,
}


# --- rendering ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Acquisition:
    rotation: float
    shift: tuple[float, float]
    zoom: float
    brightness: float
    contrast: float
    gamma: float
    noise: float
    heel: float


def _acquisition(spec: PhantomSpec) -> _Acquisition:
    rng = _rng(spec, 2, spec.followup)
    u = rng.uniform
    ap = spec.view == "AP"
    if spec.site == 2:  # higher exposure, flatter contrast, noisier detector, stronger heel effect
        return _Acquisition(
            rotation=math.radians(u(-8, 8)),
            shift=(u(-0.08, 0.08), u(-0.08, 0.08)),
            zoom=u(0.84, 0.98),
            brightness=u(0.02, 0.1),
            contrast=u(0.65, 0.9),
            gamma=u(0.7, 1.0),
            noise=u(0.03, 0.05),
            heel=u(-0.1, 0.1),
        )
    return _Acquisition(
        rotation=math.radians(u(-6, 6) if ap else u(-3, 3)),
        shift=(u(-0.05, 0.05), u(-0.06, 0.06)),
        zoom=u(0.86, 1.0) if ap else u(0.9, 1.05),
        brightness=u(-0.07, 0.07),
        contrast=u(0.75, 1.0) if ap else u(0.85, 1.15),
        gamma=u(0.8, 1.25),
        noise=u(0.01, 0.035),
        heel=u(-0.05, 0.05),
    )


def _site_marks(value: np.ndarray, spec: PhantomSpec) -> np.ndarray:
    """The second site's collimation (dark borders of random width) and a bright side marker in a top corner."""
    size = value.shape[0]
    rng = _rng(spec, 4, spec.followup)
    top, bottom, left, right = (int(size * rng.uniform(0.02, 0.1)) for _ in range(4))
    shaded = np.full_like(value, 0.04)
    shaded[top : size - bottom, left : size - right] = value[top : size - bottom, left : size - right]
    side = max(3, size // 16)
    x = left + side // 2 if rng.random() < 0.5 else size - right - 2 * side
    y = top + side // 2
    shaded[y : y + side, x : x + side] = 0.97
    shaded[y + side // 3 : y + side, x + side // 3 : x + 2 * side // 3] = 0.6  # an 'L'-like cut-out
    return shaded


def _grid(size: int, acq: _Acquisition) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy coordinates of every pixel centre."""
    p = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    dx, dy = p[None, :] - acq.shift[0], p[:, None] - acq.shift[1]
    cos, sin = math.cos(acq.rotation), math.sin(acq.rotation)
    return (cos * dx + sin * dy) / acq.zoom, (cos * dy - sin * dx) / acq.zoom


def _box(layer: np.ndarray, level: float) -> tuple[int, int, int, int] | None:
    """x, y, w, h of the pixels where |layer| reaches `level` of its peak."""
    strength = np.abs(layer)
    peak = strength.max()
    if peak <= 0:
        return None
    footprint = strength >= level * peak
    rows, cols = np.flatnonzero(footprint.any(1)), np.flatnonzero(footprint.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def render_phantom(spec: PhantomSpec, size: int, omit: Iterable[str] = ()) -> tuple[np.ndarray, dict[str, tuple[int, int, int, int]]]:
    """The (size, size) uint8 image of `spec` and a box per planted finding.

    Findings named in `omit` are left out; everything else (anatomy, other findings, acquisition,
    noise) stays identical, so the difference shows exactly where a finding was drawn.
    """
    omit = set(omit)
    if omit - set(FINDINGS):
        raise ValueError(f"unknown findings to omit: {sorted(omit - set(FINDINGS))}")
    acq, anatomy = _acquisition(spec), _anatomy(spec)
    X, Y = _grid(size, acq)
    planted = [(i, name) for i, name in enumerate(FINDINGS) if spec.labels[i]]
    layers = {name: np.empty((size, size), np.float32) for _, name in planted}
    density = np.empty((size, size), np.float32)
    rows = max(8, _BAND_PIXELS // size)
    for band in (slice(top, top + rows) for top in range(0, size, rows)):
        cv = _canvas(anatomy, X[band], Y[band])
        band_density = cv.density
        for i, name in planted:
            layer = layers[name][band] = PAINTERS[name](cv, _rng(spec, 100 + i, spec.onset[i]))
            if name not in omit:
                band_density = band_density + layer
        # Overlapping opacities cannot make the lung much denser than soft tissue.
        density[band] = np.minimum(band_density, cv.density + cv.air + 0.06)
    boxes = {name: box for name, layer in layers.items() if (box := _box(layer, _BOX_LEVEL.get(name, 0.25)))}

    rng = _rng(spec, 3, spec.followup)
    value = np.clip((density + 0.01) / 0.72, 0.0, 1.0) ** acq.gamma
    value = (value - 0.5) * acq.contrast + 0.5 + acq.brightness + acq.heel * Y
    mottle = rng.random((9, 9), dtype=np.float32)
    value += np.asarray(Image.fromarray(mottle, mode="F").resize((size, size), Image.Resampling.BICUBIC)) * (acq.noise * 1.5)
    value += rng.standard_normal((size, size), dtype=np.float32) * acq.noise - acq.noise * 0.75
    if spec.site == 2:
        value = _site_marks(value, spec)
    return np.clip(value * 255.0 + 0.5, 0, 255).astype(np.uint8), boxes


# --- the dataset on disk -----------------------------------------------------------------------


def _data_entry_rows(specs: list[PhantomSpec], size: int) -> list[str]:
    spacing = f"{_FIELD_MM / size:.4f}"
    return [
        f"{s.image_index},{format_labels(s.labels)},{s.followup},{s.patient},{s.age},{s.gender},{s.view},{size},{size},{spacing},{spacing}"
        for s in specs
    ]


def _write_png(image: np.ndarray, path: Path) -> None:
    """Write then rename, without the fsync of cxrdx.atomic: thousands of fsyncs would cost more
    than rendering. The CSV files, written last and fsynced, are what make the dataset complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image, mode="L").save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def generate_phantoms(
    out: str | Path,
    n: int = 3000,
    size: int = 256,
    seed: int = 0,
    tail_floor: float = 0.0,
    progress: bool = True,
) -> Path:
    """Write `n` phantom images with Data_Entry_2017.csv and BBox_List_2017.csv under `out`.

    Images are `out/images/PPPPPPPP_FFF.png` (patient, follow-up); boxes are in their pixels.
    `cxrdx_source.json` marks the folder as synthetic (model cards say so).
    """
    specs = _specs(n, size, seed, tail_floor, 1)
    out = Path(out)
    boxes = _render_all(specs, size, out / "images", progress)
    write_text(out / "BBox_List_2017.csv", "\n".join([BBOX_HEADER, *boxes]) + "\n")
    write_text(out / "Data_Entry_2017.csv", "\n".join([DATA_ENTRY_HEADER, *_data_entry_rows(specs, size)]) + "\n")
    _mark_synthetic(out, "cxrdx phantoms", n, size, seed, tail_floor)
    return out


def generate_second_site(
    out: str | Path,
    n: int = 1000,
    size: int = 256,
    seed: int = 0,
    tail_floor: float = 0.0,
    progress: bool = True,
) -> Path:
    """Write `n` second-site phantoms (other patients, another scanner) in the generic CSV layout.

    `out/labels.csv`: path, patient, view, sex, age and one column per finding except
    SITE2_UNLABELLED (not labelled there); images are `out/images/PPPPPPPP_FFF.png`.
    Read it with `cxrdx prepare --dataset csv --data-dir out`.
    """
    specs = _specs(n, size, seed, tail_floor, 2)
    out = Path(out)
    _render_all(specs, size, out / "images", progress)
    labelled = [(k, f) for k, f in enumerate(FINDINGS) if f not in SITE2_UNLABELLED]
    rows = [
        ",".join([f"images/{s.image_index}", f"site2-{s.patient}", s.view, s.gender, str(s.age), *(str(s.labels[k]) for k, _ in labelled)])
        for s in specs
    ]
    write_text(
        out / "labels.csv", "\n".join([",".join(["path", "patient", "view", "sex", "age", *(f for _, f in labelled)]), *rows]) + "\n"
    )
    _mark_synthetic(out, "cxrdx second-site phantoms", n, size, seed, tail_floor)
    return out


def _mark_synthetic(out: Path, name: str, n: int, size: int, seed: int, tail_floor: float) -> None:
    """The source marker that `prepare` carries into the cache and training into the checkpoint (model cards)."""
    write_source_marker(
        out,
        {
            "name": name,
            "synthetic": True,
            "images": n,
            "size": size,
            "seed": seed,
            "tail_floor": tail_floor,
            "generator": "cxrdx.data.phantoms",
            "cxrdx_version": __version__,
        },
    )


def _specs(n: int, size: int, seed: int, tail_floor: float, site: int) -> list[PhantomSpec]:
    if size < 32:
        raise CxrdxError(f"size must be at least 32 pixels, got {size}")
    return sample_specs(n, seed, tail_floor, site)


def _render_all(specs: list[PhantomSpec], size: int, folder: Path, progress: bool) -> list[str]:
    """Render and write every image into `folder`; the box rows (BBox_List_2017.csv) of their findings."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CxrdxError(f"{folder}: cannot create the output folder ({exc.strerror})") from exc
    boxes: list[str] = []
    for spec in tqdm(specs, desc="phantoms", unit="img", disable=not progress):
        image, planted = render_phantom(spec, size)
        _write_png(image, folder / spec.image_index)
        boxes.extend(f"{spec.image_index},{name},{x},{y},{w},{h}" for name, (x, y, w, h) in planted.items())
    return boxes
