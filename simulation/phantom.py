"""A lumbar spine phantom: vertebrae with cortex and a trabecular network, discs and surroundings.

Rendered in true HU on a fine grid (spine-local mm: x to the patient's left, y posterior, z superior)
before any scanner effect. The trabecular network is thresholded band-passed noise: bone loss makes
elements thinner (threshold), fewer (perforation) and further apart (coarser band), so texture, not only
mean HU, carries the bone status. Marrow fat shifts mean HU without touching texture.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import zoom
from scipy.special import erfinv

from osteo_model.constants import LABEL_PRESETS, TOTALSEG_TOTAL_NEIGHBOURS

PHANTOM_LEVELS: tuple[str, ...] = ("T12", "L1", "L2", "L3", "L4", "L5")
"""Top to bottom; L1-L4 lie fully in the scan, T12 and L5 partly."""
LABEL_IDS: dict[str, int] = {**TOTALSEG_TOTAL_NEIGHBOURS, **LABEL_PRESETS["totalseg_total"]}

HU_AIR, HU_FAT, HU_SOFT, HU_MUSCLE, HU_CSF, HU_DISC, HU_BLOOD = -1000.0, -95.0, 40.0, 52.0, 15.0, 85.0, 42.0
FLAT = 0.85  # the body's posterior wall is flat: cut at FLAT x the AP semi-axis
TEXTURE_EDGE = 0.15  # soft threshold width of the network (in SD of the noise field): partial volume


@dataclass(frozen=True)
class Vertebra:
    """One level's geometry (mm, spine-local) and bone parameters."""

    name: str
    xc: float
    yc: float
    z0: float           # inferior endplate
    z1: float           # superior endplate
    a: float            # lateral semi-axis of the body
    b: float            # AP semi-axis of the body
    bvtv: float         # trabecular bone fraction
    coarse: float       # 0..1 weight of the coarse (widely spaced) network
    perforation: float  # fraction of the network removed
    cortex_mm: float
    cortex_hu: float
    posterior_hu: float
    wedge: float = 0.0  # anterior height lost to a wedge fracture (fraction of the body height)


@dataclass(frozen=True)
class Anatomy:
    vertebrae: tuple[Vertebra, ...]
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    z_range: tuple[float, float]
    marrow_hu: float
    skin_y: float       # back skin, posterior of which is air
    fat_mm: float       # subcutaneous fat
    calcifications: int


def draw_anatomy(rng: np.random.Generator, bone: dict[str, dict], marrow_hu: float, calcifications: int,
                 truncated: str, cfg) -> Anatomy:
    """Random geometry around given bone parameters (``bone[level]`` for PHANTOM_LEVELS).

    ``truncated`` ("", "L1" or "L4") lets the scan edge cut that level; ``calcifications``: aortic wall
    plaques (drawn with the population, since the patient's DXA sees them too).
    """
    heights = 24.0 + 0.5 * np.arange(6) + rng.normal(0, 0.8, 6)
    discs = 8.0 + 0.6 * np.arange(6) + rng.normal(0, 0.7, 6)
    lordosis = rng.uniform(2.0, 6.0)
    shift_x = rng.normal(0, 1.2, 6)
    z_top = 0.0
    verts = []
    for k, name in enumerate(PHANTOM_LEVELS):
        z1 = z_top
        z0 = z1 - heights[k]
        z_top = z0 - discs[k]
        p = bone[name]
        verts.append(Vertebra(
            name=name, xc=float(shift_x[k]), yc=float(lordosis * ((k - 3.5) / 2.5) ** 2),
            z0=float(z0), z1=float(z1),
            a=float(19.5 + 1.1 * k + rng.normal(0, 0.8)), b=float(15.0 + 0.5 * k + rng.normal(0, 0.6)),
            **p,
        ))
    l1, l4 = verts[1], verts[4]
    lo, hi = cfg.phantom.margin_mm
    top, bottom = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if truncated == "L1":
        top = -rng.uniform(3.0, 8.0)
    elif truncated == "L4":
        bottom = -rng.uniform(3.0, 8.0)
    half_x = cfg.phantom.fov_x_mm / 2
    mid_x = float(np.mean([v.xc for v in verts[1:5]]))
    post_wall = max(v.yc + FLAT * v.b for v in verts)
    skin_y = post_wall + rng.uniform(36.0, 44.0)
    anterior = min(v.yc - v.b for v in verts) - rng.uniform(5.0, 9.0)
    return Anatomy(
        vertebrae=tuple(verts),
        x_range=(mid_x - half_x, mid_x + half_x),
        y_range=(anterior, skin_y + rng.uniform(4.0, 8.0)),  # air behind the back: >= 4 %
        z_range=(l4.z0 - bottom, l1.z1 + top),
        marrow_hu=marrow_hu,
        skin_y=float(skin_y),
        fat_mm=float(rng.uniform(3.0, 12.0)),
        calcifications=int(calcifications),
    )


def _band_noise(rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...],
                wavelengths: tuple[float, ...]) -> list[np.ndarray]:
    """Unit-variance noise fields band-passed around each wavelength (mm), from one white noise."""
    spectrum = np.fft.rfftn(rng.standard_normal(shape, dtype=np.float32))
    fz = np.fft.fftfreq(shape[0], spacing[0])[:, None, None]
    fy = np.fft.fftfreq(shape[1], spacing[1])[None, :, None]
    fx = np.fft.rfftfreq(shape[2], spacing[2])[None, None, :]
    radius = np.sqrt(fz**2 + fy**2 + fx**2).astype(np.float32)
    fields = []
    for wavelength in wavelengths:
        f0 = 1.0 / wavelength
        band = np.exp(-0.5 * ((radius - f0) / (0.35 * f0)) ** 2)
        field = np.fft.irfftn(spectrum * band, s=shape, axes=(0, 1, 2)).astype(np.float32)
        fields.append(field / (field.std() + 1e-12))
    return fields


def _network_fraction(n_abs: np.ndarray, keep: np.ndarray, bvtv: float) -> np.ndarray:
    """Soft-thresholded |noise| < t network, t solved so that the mean bone fraction equals bvtv."""
    lo, hi = 0.0, 4.0
    t = float(np.sqrt(2.0) * erfinv(min(bvtv, 0.95)))
    for _ in range(22):
        frac = np.clip((t - n_abs) / (2 * TEXTURE_EDGE) + 0.5, 0.0, 1.0) * keep
        if frac.mean() < bvtv:
            lo = t
        else:
            hi = t
        t = 0.5 * (lo + hi)
    return np.clip((t - n_abs) / (2 * TEXTURE_EDGE) + 0.5, 0.0, 1.0) * keep


def render(anatomy: Anatomy, spacing: tuple[float, float, float], rng: np.random.Generator,
           tissue_hu: float, wavelengths: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """True-HU volume and label map, arrays (z, y, x) with z ascending, on a grid of ``spacing`` (z, y, x)."""
    sz, sy, sx = spacing
    z = np.arange(anatomy.z_range[0], anatomy.z_range[1], sz, dtype=np.float32)
    y = np.arange(anatomy.y_range[0], anatomy.y_range[1], sy, dtype=np.float32)
    x = np.arange(anatomy.x_range[0], anatomy.x_range[1], sx, dtype=np.float32)
    shape = (len(z), len(y), len(x))
    Z, Y, X = z[:, None, None], y[None, :, None], x[None, None, :]
    hu = np.full(shape, HU_SOFT, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    verts = anatomy.vertebrae
    xc = float(np.mean([v.xc for v in verts]))
    yc = float(np.mean([v.yc for v in verts]))
    b_mean = float(np.mean([v.b for v in verts]))
    a_mean = float(np.mean([v.a for v in verts]))
    z_lo, z_hi = anatomy.z_range

    # Surroundings: slowly varying soft tissue with fat pockets (2-D fields blended along z, which is
    # cheap and keeps pockets tube-like as in the retroperitoneum), psoas and paraspinal muscles, aorta.
    coarse_shape = (max(4, shape[1] // 6), max(4, shape[2] // 6))
    planes = [zoom(f[0], [n / m for n, m in zip(shape[1:], coarse_shape)], order=1)[: shape[1], : shape[2]]
              for f in _band_noise(rng, (1, *coarse_shape), (1.0, 6 * sy, 6 * sx), (40.0, 25.0, 30.0))]
    phase = (Z - z_lo) / 60.0 + rng.uniform(0, 2 * np.pi)
    smooth = np.cos(phase) * planes[0] + np.sin(phase) * planes[1]
    fatness = np.cos(0.7 * phase) * planes[2] + np.sin(0.7 * phase) * planes[1]
    hu += 6.0 * smooth
    hu[fatness > 1.1] = HU_FAT
    grow = (z_hi - Z) / max(z_hi - z_lo, 1.0)  # psoas widens inferiorly
    for side in (-1, 1):
        psoas = ((X - (xc + side * (a_mean + 11))) / (7 + 7 * grow)) ** 2 + ((Y - (yc + 2)) / (8 + 5 * grow)) ** 2 <= 1
        hu[np.broadcast_to(psoas, shape)] = HU_MUSCLE
        erector = ((X - (xc + side * 19)) / 13) ** 2 + ((Y - (yc + b_mean + 29)) / 11) ** 2 <= 1
        hu[np.broadcast_to(erector, shape)] = HU_MUSCLE + 4
    aorta = ((X - (xc + 13)) ** 2 + (Y - (yc - b_mean - 11)) ** 2 <= 10.0**2)
    hu[np.broadcast_to(aorta, shape)] = HU_BLOOD
    for _ in range(anatomy.calcifications):  # atherosclerotic plaques in the aortic wall
        ang = rng.uniform(0, 2 * np.pi)
        cz = rng.uniform(z_lo, z_hi)
        spot = ((X - (xc + 13 + 9.5 * np.cos(ang))) ** 2 + (Y - (yc - b_mean - 11 + 9.5 * np.sin(ang))) ** 2
                + ((Z - cz) / 2.0) ** 2) <= 1.8**2
        hu[spot] = rng.uniform(300, 900)
    skin = anatomy.skin_y + 0.004 * (X - xc) ** 2
    hu[np.broadcast_to((Y > skin - anatomy.fat_mm) & (Y <= skin), shape)] = HU_FAT
    hu[np.broadcast_to(Y > skin, shape)] = HU_AIR

    # Discs between neighbouring bodies, then the spinal canal.
    for upper, lower in zip(verts[:-1], verts[1:]):
        ring = ((X - (upper.xc + lower.xc) / 2) / (0.5 * (upper.a + lower.a) + 1)) ** 2 + \
               ((Y - (upper.yc + lower.yc) / 2) / (0.5 * (upper.b + lower.b) + 0.5)) ** 2
        disc = (ring <= 1) & (Z > lower.z1 - 2) & (Z < upper.z0 + 2)
        hu[disc] = HU_DISC - 15 * (np.broadcast_to(ring, shape)[disc] < 0.4)
    canal = ((X - xc) / (0.42 * a_mean)) ** 2 + ((Y - (yc + FLAT * b_mean + 8)) / 7.5) ** 2 <= 1
    hu[np.broadcast_to(canal, shape)] = HU_CSF

    # Trabecular noise fields over the bodies' bounding box (all z).
    y0 = int(np.searchsorted(y, min(v.yc - v.b for v in verts) - 1))
    y1 = int(np.searchsorted(y, max(v.yc + v.b for v in verts) + 1))
    x0 = int(np.searchsorted(x, min(v.xc - v.a for v in verts) - 1))
    x1 = int(np.searchsorted(x, max(v.xc + v.a for v in verts) + 1))
    fine, coarse, perf = _band_noise(rng, (len(z), y1 - y0, x1 - x0), spacing, wavelengths)

    for v in verts:
        _paint_vertebra(hu, labels, v, Z, Y, X, (fine, coarse, perf), (y0, y1, x0, x1), anatomy.marrow_hu,
                        tissue_hu)
    return hu, labels


def _paint_vertebra(hu, labels, v: Vertebra, Z, Y, X, fields, box, marrow_hu: float, tissue_hu: float) -> None:
    label = LABEL_IDS[v.name]
    zs = (Z[:, 0, 0] >= v.z0 - 9) & (Z[:, 0, 0] <= v.z1 + 6)
    if not zs.any():
        return
    k0, k1 = int(np.argmax(zs)), int(len(zs) - np.argmax(zs[::-1]))
    z = Z[k0:k1]
    sub_hu, sub_lab = hu[k0:k1], labels[k0:k1]
    h = v.z1 - v.z0
    post = v.yc + FLAT * v.b

    # Posterior elements: pedicles, articular pillars, lamina, spinous and transverse processes.
    bone = np.zeros(sub_hu.shape, dtype=bool)
    for side in (-1, 1):
        px = v.xc + side * 0.55 * v.a
        bone |= (((X - px) / 4.0) ** 2 + ((z - (v.z0 + 0.62 * h)) / 6.5) ** 2 <= 1) & (Y >= v.yc) & (Y <= post + 9)
        bone |= (np.abs(X - px - side * 2.5) <= 2.5) & (Y >= post + 5) & (Y <= post + 13) & (z >= v.z0 + 0.4 * h) & (z <= v.z1 + 5)
        bone |= (np.abs(X - px + side * 2.5) <= 2.5) & (Y >= post + 5) & (Y <= post + 13) & (z >= v.z0 - 5) & (z <= v.z0 + 0.5 * h)
        tip = min(v.a + 10.0, 31.0)
        bone |= (side * (X - v.xc) >= 0.5 * v.a) & (side * (X - v.xc) <= tip) & (Y >= post + 3) & (Y <= post + 9) \
            & (z >= v.z0 + 0.45 * h) & (z <= v.z0 + 0.75 * h)
    bone |= (np.abs(X - v.xc) <= 0.6 * v.a) & (Y >= post + 13) & (Y <= post + 18) & (z >= v.z0 + 0.1 * h - 3) & (z <= v.z1 - 2)
    spin_y = np.clip(Y - (post + 17), 0, None)
    bone |= (np.abs(X - v.xc) <= 2.5) & (Y >= post + 15) & (Y <= post + 30) \
        & (z >= v.z0 - 4 - 0.3 * spin_y) & (z <= v.z0 + 0.55 * h - 0.3 * spin_y)
    sub_hu[bone] = v.posterior_hu
    sub_lab[bone] = label

    # Body: D-shaped elliptic cylinder with concave endplates, cortical shell, trabecular core; a wedge
    # fracture lowers the superior endplate anteriorly (the disc follows it down).
    r2 = ((X - v.xc) / v.a) ** 2 + ((Y - v.yc) / v.b) ** 2
    dome = 1.2 * np.clip(1 - r2, 0, 1)
    top = v.z1 - dome - v.wedge * h * np.clip((post - Y) / ((1 + FLAT) * v.b), 0, 1)
    if v.wedge > 0:
        sub_hu[(r2 <= 1) & (Y - v.yc <= FLAT * v.b) & (z > top) & (z <= v.z1)] = HU_DISC
    inside = (r2 <= 1) & (Y - v.yc <= FLAT * v.b) & (z >= v.z0 + dome) & (z <= top)
    r = np.sqrt(r2)
    ray = np.sqrt((X - v.xc) ** 2 + (Y - v.yc) ** 2)
    d_side = np.minimum((1 - r) * ray / np.maximum(r, 1e-3), FLAT * v.b - (Y - v.yc))
    d_end = np.minimum(z - (v.z0 + dome), top - z)
    shell = inside & (np.minimum(d_side, d_end) < v.cortex_mm)
    core = inside & ~shell
    sub_lab[inside] = label
    sub_hu[shell] = v.cortex_hu

    y0, y1, x0, x1 = box
    kk, jj, ii = np.nonzero(core[:, y0:y1, x0:x1])
    if len(kk) == 0:  # only the shell of a neighbour level lies in the scan
        return
    kk = kk + k0
    fine, coarse, perf = (f[kk, jj, ii] for f in fields)
    network = np.abs(np.sqrt(1 - v.coarse) * fine + np.sqrt(v.coarse) * coarse)
    q = float(np.sqrt(2.0) * erfinv(1 - 2 * v.perforation)) if v.perforation > 0 else 9.0
    keep = np.clip((q - perf) / 0.6 + 0.5, 0.0, 1.0)
    frac = _network_fraction(network, keep, v.bvtv)
    hu[kk, jj + y0, ii + x0] = marrow_hu + frac * (tissue_hu - marrow_hu)
