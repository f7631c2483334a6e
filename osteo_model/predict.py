"""``osteo-predict`` batch: a site's studies (prepared, or new CTs) -> the screening report folder.

The model is the site's complete model from its state folder unless another file is named; one whose crop
settings or feature set differ from the data's is refused (osteo_model.checkpoints.check_compatible).
New CTs go through osteo-prepare's reading, validation, cropping and radiomics with the site's settings.
Everything is written into the output folder only: report.csv, report.json, index.html, one PNG per study.
Patient identifiers are not added: a study appears under the site's own study id (or a new CT's file name,
with its parent folders where names repeat, and its files named in the report). A prepared study's image is
drawn only from the files osteo-prepare read (their digest in the cache), never beside another scan's numbers.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from osteo_model import ctio, report_html, report_png
from osteo_model.calibration import check_manufacturer
from osteo_model.central import models_from_checkpoint
from osteo_model.checkpoints import SITE_MODEL_FILE, check_compatible, load_model_state
from osteo_model.config import resolve_device
from osteo_model.crops import crop_spacing_mm
from osteo_model.dataset import SiteData, load_site_data, pin_path
from osteo_model.errors import InputError
from osteo_model.labels import label_map_from_cfg
from osteo_model.pools import worker_pool
from osteo_model.prepare import inputs_sha256, load_studies, read_and_featurise
from osteo_model.radiomics_features import extractor_for, n_workers, params_path
from osteo_model.screening import (
    RESEARCH_USE, Reference, StudyInput, StudyReport, new_ct_cache, prepared_studies, screen, site_reference,
)

CSV_COLUMNS = ("study_id", "source", "level", "evaluable", "reason", "hu_mean", "hu_median", "sbmd", "bmd", "t_score",
               "t_low", "t_high", "category", "p_osteoporosis", "flags", "interval_note", "t_note", "without_flagged",
               "l1_hu", "l1_hu_rule",
               "l1_totalseg_flag", "image", "ct", "labels")
CHANGED_NOTE = ("CT or label map changed since osteo-prepare read them (the numbers are from the files it read): "
                "no image; re-run osteo-prepare")
UNCHECKED_NOTE = ("not checked against the files osteo-prepare read (a cache prepared before it recorded their "
                  "digest): re-run osteo-prepare")
_IMAGE_SUFFIX = re.compile(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd|\.nhdr)$")


def model_card(state: dict, path: Path, site: str, local_trained: bool) -> dict[str, Any]:
    """Which model made the report: kind, run, round, sites, date, ε, and whether it has this site's local part."""
    card = state.get("card") or {}
    sites = state.get("manufacturers") or {}
    date = card.get("date") or dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
    return {
        "kind": state["kind"], "file": str(path), "run_id": card.get("run_id", path.parent.name),
        "round": card.get("round", state.get("done")), "n_sites": card.get("n_sites", len(sites) or None),
        "date": date, "epsilon": card.get("epsilon_spent", card.get("epsilon")),
        "local_part": (f"{site}'s own device expert and calibration" if local_trained
                       else "shared weights only (no device expert or calibration trained for this site)"),
        "use": RESEARCH_USE,
    }


def model_line(card: dict[str, Any]) -> str:
    """The model card in one line (fields the model file does not record are left out)."""
    eps = card.get("epsilon")
    parts = [f"Model: {card['kind']}", f"run {card['run_id']}",
             *([f"round {card['round']}"] if card.get("round") is not None else []),
             *([f"{card['n_sites']} site(s)"] if card.get("n_sites") else []), str(card["date"]),
             f"ε {eps:.2f}" if isinstance(eps, (int, float)) and math.isfinite(eps) else "no differential privacy"]
    return ", ".join(parts) + f"; {card['local_part']}"


def _safe_name(study_id: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", study_id).strip("._") or "study"
    name, k = f"{base}.png", 1
    while name in taken:
        k += 1
        name = f"{base}-{k}.png"
    taken.add(name)
    return name


def _study_table(cfg: DictConfig) -> pd.DataFrame | None:
    try:
        studies, _ = load_studies(Path(cfg.site.dir), cfg.site.studies_table)
    except InputError:
        return None
    return pd.DataFrame({"study_id": [s.study_id for s in studies], "ct": [s.ct for s in studies],
                         "labels": [s.labels for s in studies]})


def new_ct_ids(cts: Sequence[str | Path], taken: Collection[str] = ()) -> list[str]:
    """Report ids of new CTs: the file name without its image extension, with as many parent folders as it
    takes to tell apart CTs of one name (TotalSegmentator writes every case as <case>/ct.nii.gz) and from
    the ids in ``taken``; "#2", "#3" where the same file is given again."""
    parts = [(*p.absolute().parent.parts[1:], _IMAGE_SUFFIX.sub("", p.name) or p.name) for p in map(Path, cts)]
    depth = [1] * len(parts)
    while True:
        ids = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        count = Counter(ids)
        clash = [i for i, sid in enumerate(ids) if (count[sid] > 1 or sid in taken) and depth[i] < len(parts[i])]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    seen: Counter[str] = Counter()
    unique = []
    for sid in ids:
        seen[sid] += 1
        unique.append(sid if seen[sid] == 1 else f"{sid}#{seen[sid]}")
    return unique


def _new_ct(ct_path: Path, labels_path: Path, study_id: str, cfg: DictConfig, label_map: dict[str, int]):
    """A new CT through osteo-prepare's reading, checks, cropping and radiomics: (input, ct, labels)."""
    try:
        ct, label_arr, crops, features, excluded = read_and_featurise(ct_path, labels_path, label_map, cfg.crop,
                                                                      str(params_path(cfg.radiomics)))
    except InputError as exc:
        empty = new_ct_cache(study_id, [], np.zeros((0, 0)), [])
        return StudyInput(study_id, empty, np.zeros(0, int), {}, "", "new CT", ct_path, labels_path, str(exc)), None, None
    names = extractor_for(str(params_path(cfg.radiomics)), crop_spacing_mm(cfg.crop)).names
    cache = new_ct_cache(study_id, crops, features, names)
    inp = StudyInput(study_id, cache, np.arange(len(crops)), {e.level: e.reason for e in excluded}, "", "new CT",
                     ct_path, labels_path)
    return inp, ct, label_arr


@dataclass(frozen=True)
class _PngJob:
    """A prepared study's PNG, drawn in a worker process that reads the CT itself."""

    path: Path
    report: StudyReport
    ct: Path
    labels: Path
    inputs_sha256: str  # of the files osteo-prepare read; "" where the cache does not record it
    label_map: dict[str, int]
    model_line: str
    dpi: int


def _render_job(job: _PngJob) -> str:
    """Read the study's CT and draw its PNG; returns the image note ("" when the image is there and checked).
    Files that are no longer those osteo-prepare read get no image: it would show another scan than the
    numbers beside it."""
    ct = label_arr = None
    try:
        if job.inputs_sha256 and inputs_sha256(job.ct, job.labels) != job.inputs_sha256:
            job.report.image_note = CHANGED_NOTE
        else:
            ct, label_arr = ctio.read_study(job.ct, job.labels)
            job.report.image_note = "" if job.inputs_sha256 else UNCHECKED_NOTE
    except InputError as exc:
        job.report.image_note = f"CT unreadable: {exc}"
    report_png.render_study_png(job.path, job.report, ct, label_arr, job.label_map, job.model_line, job.dpi)
    return job.report.image_note


class _Writer:
    """One PNG per study (prepared studies' in a process pool at the end), then the tables and the index."""

    def __init__(self, out_dir: Path, card: dict[str, Any], label_map: dict[str, int], predict_cfg) -> None:
        self.out_dir, self.card, self.label_map = out_dir, card, label_map
        self.dpi, self.n_jobs = int(predict_cfg.png_dpi), n_workers(predict_cfg)
        self.line = model_line(card)
        self.reports: list[StudyReport] = []
        self.jobs: list[_PngJob] = []
        self.taken: set[str] = set()
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, report: StudyReport, study: StudyInput, ct=None, label_arr=None) -> None:
        """Queue a prepared study's PNG, or draw a new CT's (``ct``/``label_arr``: in memory; None: unreadable)."""
        report.image = _safe_name(report.study_id, self.taken)
        self.reports.append(report)
        if study.source == "prepared" and study.ct is not None and study.labels is not None:
            self.jobs.append(_PngJob(self.out_dir / report.image, report, study.ct, study.labels, study.inputs_sha256,
                                     self.label_map, self.line, self.dpi))
            return
        if ct is None:
            report.image_note = study.problem or "CT and label map not listed in the site's studies table"
        report_png.render_study_png(self.out_dir / report.image, report, ct, label_arr, self.label_map, self.line, self.dpi)

    def _draw_queued(self, progress: bool) -> None:
        n = min(self.n_jobs, len(self.jobs))
        with worker_pool(n) if n > 1 else nullcontext() as pool:
            results = pool.map(_render_job, self.jobs) if pool is not None else map(_render_job, self.jobs)
            for job, note in tqdm(zip(self.jobs, results), total=len(self.jobs), desc="report images", unit="study",
                                  disable=not progress):
                job.report.image_note = note

    def finish(self, site: str, progress: bool) -> Path:
        self._draw_queued(progress)
        records = [_clean(asdict(r)) for r in self.reports]
        (self.out_dir / "report.json").write_text(json.dumps(
            {"site": site, "model": self.card, "use": RESEARCH_USE, "studies": records}, indent=1, allow_nan=False), encoding="utf-8")
        pd.DataFrame(_csv_rows(self.reports), columns=list(CSV_COLUMNS)).to_csv(self.out_dir / "report.csv", index=False)
        return report_html.write_index(self.out_dir / "index.html", self.reports, site, self.line)


def _clean(value: Any) -> Any:
    """NaN -> None, so that report.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _csv_rows(reports: list[StudyReport]) -> list[dict[str, Any]]:
    rows = []
    for r in reports:
        study = {"study_id": r.study_id, "source": r.source, "image": r.image, "ct": r.ct, "labels": r.labels}
        for lv in r.levels:
            rows.append({**study, **{k: v for k, v in asdict(lv).items() if k != "flags"}, "flags": "; ".join(lv.flags)})
        p = r.patient
        rows.append({**study, "level": "patient", "evaluable": p.evaluable,
                     "reason": p.reason, "bmd": p.bmd, "t_score": p.t_score, "t_low": p.t_low, "t_high": p.t_high,
                     "category": p.category, "l1_hu": p.l1_hu, "flags": "; ".join(r.flags),
                     "interval_note": p.interval_note, "t_note": p.t_note, "without_flagged": p.without_flagged,
                     "l1_hu_rule": p.l1_hu_rule,
                     "l1_totalseg_flag": p.l1_totalseg_flag})
    return rows


def run_predict(cfg: DictConfig, model_path: str | Path | None = None, study_ids: Sequence[str] | None = None,
                new_cts: Sequence[tuple[str | Path, str | Path]] = (), out_dir: str | Path | None = None,
                progress: bool = True) -> Path:
    """Write the report folder; returns index.html. Prepared studies unless only new CTs are given."""
    site, cache_dir = str(cfg.site.name), Path(cfg.site.cache_dir)
    data: SiteData | None = None
    if (cache_dir / "manifest.json").is_file():
        data = load_site_data(cache_dir, cfg, pin=pin_path(cfg))
    elif not new_cts:
        raise InputError(cache_dir, "no prepared cache for this site: run osteo-prepare first, or give --ct and --labels")
    path = Path(model_path) if model_path else Path(cfg.site.state_dir) / SITE_MODEL_FILE
    state = load_model_state(path)
    if data is not None and (study_ids or not new_cts):
        check_compatible(state, data.cache.manifest.get("crop"), data.cache.feature_names)
    if new_cts:
        names = extractor_for(str(params_path(cfg.radiomics)), crop_spacing_mm(cfg.crop)).names
        check_compatible(state, OmegaConf.to_container(cfg.crop, resolve=True), names)
    manufacturer = data.manufacturer if data is not None else check_manufacturer(cfg.site.dxa_manufacturer)
    local = site in state["manufacturers"]
    model = models_from_checkpoint(state, cfg, new_sites=None if local else {site: manufacturer})[site]
    device = resolve_device(cfg)
    ref = site_reference(model, data, cfg.predict, device, state.get("card") or {})
    label_map = label_map_from_cfg(cfg.site)  # what osteo-prepare uses for this site
    writer = _Writer(Path(out_dir or cfg.predict.out_dir), model_card(state, path, site, local), label_map, cfg.predict)
    if data is not None and (study_ids or not new_cts):
        _prepared(writer, model, data, cfg, study_ids, ref, device, progress)
    ids = new_ct_ids([ct for ct, _ in new_cts], {r.study_id for r in writer.reports})
    for (ct_path, labels_path), study_id in tqdm(zip(new_cts, ids), desc="new CTs", unit="study", total=len(ids),
                                                 disable=not progress or len(new_cts) < 2):
        study, ct, label_arr = _new_ct(Path(ct_path), Path(labels_path), study_id, cfg, label_map)
        report = screen(model, [study], ref, cfg.predict, device)[0]
        report.ct, report.labels = str(ct_path), str(labels_path)
        writer.add(report, study, ct, label_arr)
    return writer.finish(site, progress)


def _prepared(writer: _Writer, model, data: SiteData, cfg: DictConfig, study_ids, ref: Reference, device: str,
              progress: bool) -> None:
    studies = prepared_studies(data, _study_table(cfg), study_ids)
    for report, study in zip(screen(model, studies, ref, cfg.predict, device), studies):
        writer.add(report, study)
