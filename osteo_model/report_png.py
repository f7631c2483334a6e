"""One PNG per study for a radiologist: sagittal and coronal reformats through L1-L4 with each vertebral
body outlined in the colour of its WHO category, the values beside them, and a T-score strip with the
WHO bands. Reformats are shown in radiological convention (sagittal: anterior left; coronal: patient's
right on the viewer's left; superior up) in a bone window, at true physical aspect.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.gridspec import GridSpec  # noqa: E402

from osteo_model.constants import LEVELS, T_NORMAL_MIN, T_OSTEOPOROSIS_MAX  # noqa: E402
from osteo_model.crops import anterior_body  # noqa: E402
from osteo_model.labels import level_boxes  # noqa: E402
from osteo_model.screening import RESEARCH_USE, SCREENING_ESTIMATE, StudyReport, region_name  # noqa: E402

COLOURS = {"normal": "#1a9850", "osteopenia": "#f39c12", "osteoporosis": "#d73027", "": "#9e9e9e"}
"""Category colours (green / amber / red; grey = not evaluable), the same in PNG and HTML."""


def category_colour(category: str) -> str:
    """A category's colour; grey for one without a colour (e.g. "unknown"): a report is never lost to it."""
    return COLOURS.get(category, COLOURS[""])


BONE_WINDOW = (-250.0, 1250.0)
"""HU display range (window 1500, level 500): cortex and trabecular texture both visible."""
MARGIN_MM = (25.0, 35.0)
"""Context shown around the L1-L4 bodies: above/below, and in front/beside."""
T_AXIS = (-5.0, 2.5)
WRAP = 58
"""Characters per line of the value panel."""


def _lps(ct: sitk.Image, label_arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CT and labels reoriented to LPS (array axes z=S, y=P, x=L; identity direction), spacing and origin."""
    labels = sitk.GetImageFromArray(label_arr.astype(np.int32, copy=False))
    labels.CopyInformation(ct)
    ct_o, lab_o = sitk.DICOMOrient(ct, "LPS"), sitk.DICOMOrient(labels, "LPS")
    return (sitk.GetArrayFromImage(ct_o), sitk.GetArrayFromImage(lab_o), np.asarray(ct_o.GetSpacing())[::-1],
            np.asarray(ct_o.GetOrigin())[::-1])


def body_labels(label_arr: np.ndarray, spacing_zyx: np.ndarray, label_map: Mapping[str, int]) -> np.ndarray:
    """Level index + 1 where a level's vertebral body is (osteo_model.crops.anterior_body), else 0."""
    bodies = np.zeros(label_arr.shape, np.uint8)
    for i, (level, box) in enumerate(level_boxes(label_arr, label_map).items()):
        if box is None:
            continue
        mask = label_arr[box] == label_map[level]
        zyx = np.argwhere(mask)
        points = (zyx + [s.start for s in box]) * spacing_zyx  # (z, y, x) mm; only relative positions matter
        body = anterior_body(mask, zyx, points[:, ::-1], float(spacing_zyx.max()))
        bodies[box][body] = LEVELS.index(level) + 1 if level in LEVELS else i + 1
    return bodies


def _view(bodies: np.ndarray, shape: tuple[int, ...], spacing: np.ndarray) -> tuple[tuple[slice, ...], int, int]:
    """Crop window (z, y, x slices), sagittal x index and coronal y index through the bodies."""
    idx = np.argwhere(bodies)
    if not len(idx):
        return tuple(slice(0, n) for n in shape), shape[2] // 2, shape[1] // 2
    lo, hi = idx.min(0), idx.max(0)
    pad = np.array([MARGIN_MM[0], MARGIN_MM[1], MARGIN_MM[1]]) / spacing
    pad[1] = pad[1] * 2  # show the canal and posterior elements behind the bodies
    start = np.maximum(np.floor(lo - pad).astype(int), 0)
    stop = np.minimum(np.ceil(hi + pad).astype(int) + 1, shape)
    x_mid, y_mid = int(np.median(idx[:, 2])), int(np.median(idx[:, 1]))
    return tuple(slice(a, b) for a, b in zip(start, stop)), x_mid, y_mid


def _fmt(value: float, spec: str) -> str:
    return format(value, spec) if np.isfinite(value) else "-"


def _level_lines(report: StudyReport) -> list[tuple[str, str]]:
    lines = []
    for lv in report.levels:
        if not lv.evaluable:
            lines.append(("\n".join(textwrap.wrap(f"{lv.level}  not evaluable: {lv.reason}", WRAP)), ""))
            continue
        interval = f" [{_fmt(lv.t_low, '.1f')}, {_fmt(lv.t_high, '.1f')}]" if np.isfinite(lv.t_low) else ""
        text = (f"{lv.level}  T {lv.t_score:+.1f}{interval}  {lv.category}, P(osteoporosis) {lv.p_osteoporosis:.2f}\n"
                f"HU {lv.hu_mean:.0f} (median {lv.hu_median:.0f})   BMD {lv.bmd:.3f} g/cm²")
        flags = textwrap.wrap("⚠ " + "; ".join(lv.flags), WRAP) if lv.flags else []
        lines.append(("\n".join([text, *flags]), lv.category))
    return lines


def _outline(bodies: np.ndarray, colours: Mapping[int, str]) -> np.ndarray:
    """RGBA image of each body's outline (pixels of a body with a neighbour outside it) in its colour:
    one image instead of a contour per level, which is what keeps a batch fast."""
    inside = np.pad(bodies, 1)
    edge = (bodies > 0) & ((inside[:-2, 1:-1] != bodies) | (inside[2:, 1:-1] != bodies)
                           | (inside[1:-1, :-2] != bodies) | (inside[1:-1, 2:] != bodies))
    rgba = np.zeros((*bodies.shape, 4))
    for k, colour in colours.items():
        rgba[edge & (bodies == k)] = matplotlib.colors.to_rgba(colour)
    return rgba


class _Canvas:
    """The figure skeleton (axes, WHO bands, titles), built once per process: creating axes costs more than
    drawing a study. Each study's artists are registered with ``add``, saved, and removed by ``clear``."""

    def __init__(self) -> None:
        self.fig = plt.figure(figsize=(13, 8))
        grid = GridSpec(2, 3, figure=self.fig, width_ratios=[1, 1, 1.35], height_ratios=[4, 1], hspace=0.25,
                        wspace=0.3, left=0.08, right=0.99)
        self.sag, self.cor, self.values = (self.fig.add_subplot(grid[0, i]) for i in range(3))
        for ax, title, sides in ((self.sag, "sagittal (anterior left)", "AP"), (self.cor, "coronal (patient's right left)", "RL")):
            ax.set_title(title, fontsize=10)
            ax.set_axis_off()
            for x, label, ha in ((0.01, sides[0], "left"), (0.99, sides[1], "right")):
                ax.text(x, 0.01, label, transform=ax.transAxes, color="white", fontsize=9, ha=ha, va="bottom", zorder=5)
        self.values.set_axis_off()
        self.strip = self.fig.add_subplot(grid[1, :])
        _strip_bands(self.strip)
        self.artists: list = []

    def add(self, artist):
        self.artists.extend(artist if isinstance(artist, list) else [artist])
        return artist

    def clear(self) -> None:
        for artist in self.artists:
            artist.remove()
        self.artists.clear()


_CANVAS: _Canvas | None = None


def _canvas() -> _Canvas:
    global _CANVAS
    if _CANVAS is None:
        _CANVAS = _Canvas()
    return _CANVAS


def _panel(c: _Canvas, ax, image: np.ndarray, bodies: np.ndarray, extent: tuple[float, ...], zs: np.ndarray,
           labels: Mapping[int, tuple[str, str]]) -> None:
    """One reformat: bone window, outlines, and beside each body its label (``labels``: index -> text, colour)."""
    c.add(ax.imshow(image, cmap="gray", vmin=BONE_WINDOW[0], vmax=BONE_WINDOW[1], origin="lower", extent=extent,
                    interpolation="bilinear"))
    c.add(ax.imshow(_outline(bodies, {k: col for k, (_, col) in labels.items()}), origin="lower", extent=extent,
                    interpolation="nearest"))
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    beside = matplotlib.transforms.blended_transform_factory(ax.transAxes, ax.transData)  # x: axes, z: mm
    for k, (text, colour) in labels.items():
        rows = np.flatnonzero((bodies == k).any(axis=1))
        if len(rows):  # outside the image, level with the body, so that no bone is hidden
            c.add(ax.text(-0.02, zs[rows].mean(), text, color=colour, fontsize=9, fontweight="bold", va="center",
                          ha="right", transform=beside))


def _strip_bands(ax) -> None:
    ax.axvspan(T_AXIS[0], T_OSTEOPOROSIS_MAX, color=COLOURS["osteoporosis"], alpha=0.25)
    ax.axvspan(T_OSTEOPOROSIS_MAX, T_NORMAL_MIN, color=COLOURS["osteopenia"], alpha=0.25)
    ax.axvspan(T_NORMAL_MIN, T_AXIS[1], color=COLOURS["normal"], alpha=0.25)
    for x, name in ((-3.75, "osteoporosis  T ≤ −2.5"), (-1.75, "osteopenia"), (0.75, "normal  T ≥ −1.0")):
        ax.text(x, 1.02, name, ha="center", va="bottom", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set_xlim(*T_AXIS)
    ax.set_yticks([])
    ax.set_xlabel("T-score (site's DXA reference, each level's own); bars: uncertainty interval", fontsize=8)
    ax.tick_params(labelsize=8)


def _t_strip(c: _Canvas, report: StudyReport) -> None:
    ax = c.strip
    rows = [(lv.level, lv.t_score, lv.t_low, lv.t_high, lv.category) for lv in report.levels if lv.evaluable]
    p = report.patient
    if p.evaluable:
        rows.append(("L1-L4", p.t_score, p.t_low, p.t_high, p.category))
    for i, (name, t, lo, hi, cat) in enumerate(rows):
        y = len(rows) - i
        big = name == "L1-L4"
        if np.isfinite(lo):
            c.add(ax.plot([lo, hi], [y, y], color="black", lw=1.2))
        c.add(ax.plot([np.clip(t, *T_AXIS)], [y], marker="D" if big else "o", ms=9 if big else 6,
                      color=category_colour(cat), markeredgecolor="black"))
        c.add(ax.text(T_AXIS[0] + 0.05, y, name, va="center", fontsize=8, fontweight="bold" if big else "normal"))
    ax.set_xlim(*T_AXIS)
    ax.set_ylim(0.3, max(len(rows), 1) + 0.7)


def render_study_png(path: Path, report: StudyReport, ct: sitk.Image | None, label_arr: np.ndarray | None,
                     label_map: Mapping[str, int], model_line: str, dpi: int = 80) -> Path:
    """Write the study's PNG. Without a CT (unreadable), the values and the T-score strip only."""
    c = _canvas()
    p = report.patient
    headline = (f"{region_name(p.levels_used)}: T {p.t_score:+.1f}, {p.category}" if p.evaluable
                else f"patient {p.reason}")
    c.fig.suptitle(f"Study {report.study_id}   —   {headline}", fontsize=13, fontweight="bold",
                   color=category_colour(p.category if p.evaluable else ""), y=0.985)
    c.add(c.fig.text(0.5, 0.935, f"{SCREENING_ESTIMATE}. {model_line}\n{RESEARCH_USE}", ha="center", fontsize=8,
                     color="#444444"))
    try:
        if ct is not None and label_arr is not None:
            _reformats(c, report, ct, label_arr, label_map)
        else:
            c.add(c.fig.text(0.3, 0.55, "\n".join(["image unavailable", *textwrap.wrap(report.image_note, 60)]),
                             ha="center", va="center", fontsize=11))
        _values(c, report)
        _t_strip(c, report)
        path.parent.mkdir(parents=True, exist_ok=True)
        c.fig.savefig(path, dpi=dpi, pil_kwargs={"compress_level": 1})  # fast to write; a few 100 kB
    finally:
        c.clear()
    return path


def _around_spine(ct: sitk.Image, label_arr: np.ndarray, label_map: Mapping[str, int]) -> tuple[sitk.Image, np.ndarray]:
    """The part of the scan around the labelled levels and the view's margins: reorienting and outlining a
    whole 512 x 512 abdomen would cost seconds per study for pixels that are not shown."""
    boxes = [b for b in level_boxes(label_arr, label_map).values() if b is not None]
    if not boxes:
        return ct, label_arr
    pad = np.ceil(2 * max(MARGIN_MM) / np.asarray(ct.GetSpacing())[::-1]).astype(int)
    lo = np.maximum(np.min([[s.start for s in b] for b in boxes], axis=0) - pad, 0)
    hi = np.minimum(np.max([[s.stop for s in b] for b in boxes], axis=0) + pad, label_arr.shape)
    window = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return ct[window[2], window[1], window[0]], label_arr[window]  # SimpleITK indexes (x, y, z), keeps positions


def _reformats(c: _Canvas, report: StudyReport, ct: sitk.Image, label_arr: np.ndarray, label_map: Mapping[str, int]) -> None:
    ct_arr, lab, spacing, origin = _lps(*_around_spine(ct, label_arr, label_map))
    bodies = body_labels(lab, spacing, label_map)
    window, xi, yi = _view(bodies, ct_arr.shape, spacing)
    zs = origin[0] + spacing[0] * np.arange(window[0].start, window[0].stop)
    ys = origin[1] + spacing[1] * np.arange(window[1].start, window[1].stop)
    xs = origin[2] + spacing[2] * np.arange(window[2].start, window[2].stop)

    def extent(a: np.ndarray) -> tuple[float, ...]:
        return (a[0], a[-1], zs[0], zs[-1])

    sag = np.asarray(ct_arr[window[0], window[1], xi])
    cor = np.asarray(ct_arr[window[0], yi, window[2]])
    sag_b, cor_b = bodies[window[0], window[1], xi], bodies[window[0], yi, window[2]]
    labels = {}
    for lv in report.levels:
        labels[LEVELS.index(lv.level) + 1] = (f"{lv.level} T {lv.t_score:+.1f}" if lv.evaluable else f"{lv.level} excluded",
                                              category_colour(lv.category if lv.evaluable else ""))
    _panel(c, c.sag, sag, sag_b, extent(ys), zs, labels)
    _panel(c, c.cor, cor, cor_b, extent(xs), zs, {k: (t.split()[0], col) for k, (t, col) in labels.items()})


def _values(c: _Canvas, report: StudyReport) -> None:
    """Per-level lines (a square in the category colour, the numbers in black), then the patient summary."""
    ax = c.values
    y = 0.98
    for text, cat in _level_lines(report):
        c.add(ax.text(0.0, y, "■", fontsize=12, va="top", color=category_colour(cat)))
        c.add(ax.text(0.05, y, text, fontsize=9, va="top", color="black" if cat else "#555555"))
        y -= 0.115
    p = report.patient
    summary = ["Patient (ISCD: mean of evaluable L1-L4, at least two levels)"]
    if p.evaluable:
        interval = f" [{p.t_low:.1f}, {p.t_high:.1f}]" if np.isfinite(p.t_low) else ""
        summary.append(f"BMD {p.bmd:.3f} g/cm²   T {p.t_score:+.1f}{interval}   {p.category}")
    else:
        summary.append(p.reason)
    summary += [line for note in (p.without_flagged, p.t_note, p.interval_note) if note for line in textwrap.wrap(note, WRAP)]
    summary += textwrap.wrap(f"L1-HU rule (Pickhardt 2013): {p.l1_hu_rule}", WRAP)
    summary.append(f"TotalSegmentator rule: {p.l1_totalseg_flag}")
    summary += [line for flag in report.flags for line in textwrap.wrap("⚠ " + flag, WRAP)]
    c.add(ax.text(0.0, y - 0.02, "\n".join(summary), fontsize=9, va="top", linespacing=1.5))
