"""``osteo-prepare``: a site folder -> the site's prepared cache, incrementally.

1. Validate everything first: studies table, DXA table, CT<->DXA pairing; per study a content key
   (input bytes + the settings that shape its entry + its DXA pairing) and, unless an entry
   ``<cache_dir>/entries/<key>.npz`` already exists, the CT/label headers (DICOM slice positions,
   label map in the CT's space).
2. Studies without an entry are read, cropped and featurised (pyradiomics) in a process pool, one
   study per task, each entry written atomically by its worker; the others are skipped as cached.
3. Consolidate this run's entries into the memory-mappable cache (``osteo_model.cache``) and write
   ``quarantine.csv``: every case left out, and why.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from osteo_model import ctio, dxa
from osteo_model.atomic import atomic_file, remove_stale_temporaries
from osteo_model.cache import INDEX_COLUMNS, write_site_cache
from osteo_model.constants import LEVELS
from osteo_model.crops import LevelExclusion, VertebraCrop, check_crop_cfg, crop_levels, crop_spacing_mm
from osteo_model.errors import ConfigError, InputError
from osteo_model.labels import label_map_from_cfg
from osteo_model.pools import worker_pool
from osteo_model.quarantine import LEVEL_EXCLUDED, QUARANTINED, Problem, write_quarantine_csv
from osteo_model.radiomics_features import extractor_for, n_workers, params_digest, params_path
from osteo_model.site_tables import read_site_table

ENTRY_VERSION = 4
"""Bump when the content of an entry changes, so old entries are recomputed (2: level anatomy checks, HU on body
tissue; 3: a mask off its bone, a body too small a share of its vertebra, a label in pieces, a NIfTI header
without orientation or with a voxel size of 0; 4: a label too small, or a body too large a share, beside the other
levels; weak bone no longer taken for soft tissue; a narrow field of view no longer taken for raw values)."""
STUDY_COLUMNS = ("study_id", "patient_id", "ct_date", "ct", "labels")


@dataclass(frozen=True)
class Study:
    study_id: str
    patient_id: str
    ct_date: pd.Timestamp
    ct: Path
    labels: Path
    scanner: str = ""


@dataclass
class Summary:
    prepared: int = 0
    cached: int = 0
    quarantined: int = 0
    vertebrae: int = 0
    labeled_vertebrae: int = 0
    excluded_levels: int = 0
    unlabeled_studies: int = 0
    dxa_rows_quarantined: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Site-wide facts the operator must see in the summary line (e.g. no DXA table at all)."""

    def line(self) -> str:
        return "; ".join([
            f"prepared {self.prepared}, skipped as cached {self.cached}, quarantined {self.quarantined} studies",
            f"{self.vertebrae} vertebrae ({self.labeled_vertebrae} labeled), {self.excluded_levels} levels excluded, "
            f"{self.unlabeled_studies} studies unlabeled, {self.dxa_rows_quarantined} DXA rows quarantined", *self.notes])


def load_studies(site_dir: Path, table_name: str) -> tuple[list[Study], list[Problem]]:
    """Read ``studies.csv``; rows without ids, with a duplicate study_id, a bad or future date or more values
    than columns are quarantined (export dialects: ``osteo_model.site_tables``)."""
    path = site_dir / table_name
    if not path.is_file():
        raise InputError(path, "studies table not found")
    raw, bad_lines = read_site_table(path, STUDY_COLUMNS, "studies table")
    problems = [Problem(f"{table_name} line {line}", table_name, reason) for line, reason in bad_lines.items()]
    duplicated = raw["study_id"].duplicated(keep=False)
    today = pd.Timestamp.today().normalize()
    studies = []
    for i, r in raw.iterrows():
        case = r["study_id"] or f"{table_name} line {r['line']}"
        date = pd.to_datetime(r["ct_date"], format="%Y-%m-%d", errors="coerce")
        reason = ("missing study_id or patient_id" if not (r["study_id"] and r["patient_id"])
                  else "duplicate study_id" if duplicated[i]
                  else f"empty {'ct' if not r['ct'] else 'labels'} column" if not (r["ct"] and r["labels"])
                  else "ct_date not YYYY-MM-DD" if pd.isna(date)
                  else f"ct_date {r['ct_date']} is in the future" if date > today else None)
        if reason:
            problems.append(Problem(case, table_name, reason))
            continue
        studies.append(Study(r["study_id"], r["patient_id"], date, site_dir / r["ct"], site_dir / r["labels"],
                             r.get("scanner", "")))
    return studies, problems


def _relative(path: Path | None, site_dir: Path) -> str:
    if path is None:
        return ""
    try:
        return str(path.relative_to(site_dir))
    except ValueError:
        return str(path)


def _hash_inputs(paths: Iterable[Path], *digests: Any) -> list[bytes]:
    """Each file's name and SHA-256 (a DICOM folder: each of its files) into every digest; each file read once.
    Returns each path's content digest (its files' bytes only, names left out: a copy under another name
    is the same scan)."""
    contents = []
    for path in paths:
        if not path.exists():
            raise InputError(path, "file not found")
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        content = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                file_sha = hashlib.file_digest(fh, "sha256").digest()
            content.update(file_sha)
            for digest in digests:
                digest.update(f.name.encode())
                digest.update(file_sha)
        contents.append(content.digest())
    return contents


def inputs_sha256(ct: Path, labels: Path) -> str:
    """Digest of a study's CT and label files alone, recorded in the index at preparation: osteo-predict
    recomputes it to tell whether the files changed since their numbers were cached."""
    digest = hashlib.sha256()
    _hash_inputs((ct, labels), digest)
    return digest.hexdigest()


class StudyDigests(NamedTuple):
    key: str         # the entry's content key: the files' bytes, the DXA pairing and the settings
    inputs: str      # inputs_sha256
    ct_content: str  # the CT's bytes alone, to find one scan listed twice


def study_key(study: Study, pairing: dxa.Pairing, settings: str) -> StudyDigests:
    """A study's digests, from one read of its files."""
    digest, inputs = hashlib.sha256(f"{ENTRY_VERSION}|{settings}".encode()), hashlib.sha256()
    meta = {"study": asdict(study) | {"ct": study.ct.name, "labels": study.labels.name},
            "dxa": pairing.dxa, "interval": pairing.interval_days}
    digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    ct_content, _ = _hash_inputs((study.ct, study.labels), digest, inputs)
    return StudyDigests(digest.hexdigest()[:32], inputs.hexdigest(), ct_content.hex())


def same_scan_twice(studies: list[tuple[Study, str]]) -> dict[str, str]:
    """Why studies listed with a CT another study already has are left out (study_id -> reason), from
    (study, CT content digest) in table order. Under two patients the scan's DXA labels and its place in the
    patient split are both in doubt, so every copy goes; under one patient the first is kept."""
    by_content: dict[str, list[Study]] = {}
    for study, content in studies:
        by_content.setdefault(content, []).append(study)
    reasons = {}
    for first, *later in by_content.values():
        if any(s.patient_id != first.patient_id for s in later):
            group = [first, *later]
            for study in group:
                copies = ", ".join(sorted(s.study_id for s in group if s is not study))
                reasons[study.study_id] = (f"same CT file content as study {copies} of another patient_id: "
                                           "one scan under two patients?")
        else:
            for study in later:
                reasons[study.study_id] = f"same CT file content as study {first.study_id} of the same patient: duplicate"
    return reasons


def _index_row(study: Study, pairing: dxa.Pairing, crop: VertebraCrop, spacing: str) -> dict[str, Any]:
    """A vertebra's cache row as its entry stores it: what the crop and the paired DXA exam say, without the
    labels, which :func:`_label` derives when the cache is assembled."""
    row: dict[str, Any] = {
        "study_id": study.study_id, "patient_id": study.patient_id, "level": crop.level,
        "level_idx": LEVELS.index(crop.level), "ct_date": study.ct_date.date().isoformat(),
        "scanner": study.scanner, "spacing_mm": spacing, "hu_mean": crop.hu_mean, "hu_median": crop.hu_median,
        "hu_std": crop.hu_std, "body_volume_ml": crop.body_volume_ml,
        "dxa_manufacturer": "", "dxa_model": "", "dxa_date": "", "interval_days": np.nan, "sex": "", "age": np.nan,
    }
    if pairing.dxa is not None:
        row.update(dxa_manufacturer=pairing.dxa["manufacturer"], dxa_model=pairing.dxa["model"],
                   dxa_date=pairing.dxa["dxa_date"].date().isoformat(), interval_days=pairing.interval_days,
                   sex=pairing.dxa["sex"], age=pairing.dxa["age"])
    return row


def _label(row: dict[str, Any], pairing: dxa.Pairing) -> None:
    """Set ``row``'s DXA labels of its level under today's rule (dxa.level_labels), also over those an
    entry written under an older rule holds: a label rule is not the crop's, so changing it recomputes no crop."""
    row.update(dxa.level_labels(pairing.dxa, row["level"]))
    row["labeled"] = bool(np.isfinite(row["bmd"]))


@dataclass(frozen=True)
class StudyTask:
    """Everything a worker process needs to prepare one study's entry."""

    study: Study
    pairing: dxa.Pairing
    entry: Path
    label_map: dict[str, int]
    crop: DictConfig
    params_file: str


def prepare_study(task: StudyTask) -> tuple[Path | None, str] | None:
    """Read, crop and featurise one study, then write its entry; (file, reason) if it cannot be used."""
    study = task.study
    try:
        ct, _, crops, features, excluded = read_and_featurise(study.ct, study.labels, task.label_map, task.crop,
                                                              task.params_file)
    except InputError as exc:
        return exc.path, exc.reason
    spacing = ",".join(f"{v:.3g}" for v in ct.GetSpacing())
    rows = [_index_row(study, task.pairing, c, spacing) for c in crops]
    _write_entry(task.entry, crops, features, rows, excluded, int(task.crop.size))
    return None


def read_and_featurise(ct_path: Path, labels_path: Path, label_map: dict[str, int], crop_cfg, params_file: str):
    """One scan read, checked, cropped and featurised: (ct, label array, crops, features, exclusions), what
    osteo-prepare caches and osteo-predict computes for a new CT. Anything that fails on this scan is an
    InputError naming a file: whatever else one odd scan makes a library raise (even MemoryError) too, so
    the other studies carry on."""
    try:
        ct, label_arr = ctio.read_study(ct_path, labels_path)
        return ct, label_arr, *featurise_study(ct, label_arr, label_map, crop_cfg, params_file)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(ct_path, f"preparation failed ({type(exc).__name__}: {str(exc)[:200]})") from exc


def featurise_study(ct, label_arr: np.ndarray, label_map: dict[str, int], crop_cfg, params_file: str,
                    ) -> tuple[list[VertebraCrop], np.ndarray, list[LevelExclusion]]:
    """Crops, radiomic features and exclusions of one read study (ctio.read_study): what osteo-prepare
    caches and what osteo-predict computes for a new CT, so both see the same numbers."""
    results = crop_levels(ct, label_arr, label_map, crop_cfg)
    crops = [r for r in results if isinstance(r, VertebraCrop)]
    excluded = [r for r in results if isinstance(r, LevelExclusion)]
    extractor = extractor_for(params_file, crop_spacing_mm(crop_cfg))
    features, errors = extractor.extract_many([c.crop for c in crops], [c.mask for c in crops])
    kept = [i for i, e in enumerate(errors) if e is None]
    excluded += [LevelExclusion(crops[i].level, f"radiomics failed: {e}") for i, e in enumerate(errors) if e]
    return [crops[i] for i in kept], features[kept], excluded


def _run(tasks: list[StudyTask], n_jobs: int) -> Iterator[tuple[StudyTask, tuple[Path | None, str] | None]]:
    """(task, failure) in completion order: in this process for one job, else in a process pool."""
    if n_jobs == 1 or len(tasks) < 2:
        yield from ((t, prepare_study(t)) for t in tasks)
        return
    with worker_pool(min(n_jobs, len(tasks))) as pool:
        futures = {pool.submit(prepare_study, t): t for t in tasks}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _write_entry(path: Path, crops: list[VertebraCrop], features: np.ndarray, rows: list[dict], excluded: list[LevelExclusion], size: int) -> None:
    """Write one study's entry atomically: a reader finds the whole entry or none."""
    shape = (len(crops), size, size, size)
    with atomic_file(path, sweep=False) as fh:  # check_writable swept the entries folder once
        np.savez(
            fh,
            crops=np.stack([c.crop for c in crops]) if crops else np.zeros(shape, np.int16),
            masks=np.stack([c.mask for c in crops]) if crops else np.zeros(shape, np.uint8),
            features=features.astype(np.float32),
            rows=np.array(json.dumps(rows, default=float)),
            excluded=np.array(json.dumps([asdict(e) for e in excluded])),
        )


def _load_entry(path: Path) -> dict[str, Any]:
    with np.load(path) as z:
        return {"crops": z["crops"], "masks": z["masks"], "features": z["features"],
                "rows": json.loads(str(z["rows"])), "excluded": [LevelExclusion(**e) for e in json.loads(str(z["excluded"]))]}


def prepare_site(cfg: DictConfig, progress: bool = True) -> Summary:
    """Prepare ``cfg.site`` into ``cfg.site.cache_dir``; return the summary (also printed)."""
    run = _SiteRun(cfg, progress)
    run.check_writable()
    valid, dxa_table = run.validate()
    failed = run.prepare(valid)
    parts = run.collect([(s, k) for s, k in valid if s.study_id not in failed])
    manufacturer = dxa.dominant_manufacturer(dxa_table, cfg.site.dxa_manufacturer)
    _consolidate(run.cache_dir, cfg, parts, run.feature_names, run.label_map, manufacturer)
    summary = run.summary
    summary.vertebrae = sum(len(p["rows"]) for p in parts)
    summary.labeled_vertebrae = sum(r["labeled"] for p in parts for r in p["rows"])
    write_quarantine_csv(run.cache_dir / "quarantine.csv", summary.problems)
    report = f"; see {run.cache_dir / 'quarantine.csv'}" if summary.problems else ""
    print(f"osteo-prepare {cfg.site.name}: {summary.line()}; cache {run.cache_dir}{report}")
    return summary


class _SiteRun:
    """One preparation run of one site: its settings, its summary and the problems found so far."""

    def __init__(self, cfg: DictConfig, progress: bool) -> None:
        self.cfg, self.progress = cfg, progress
        self.site_dir, self.cache_dir = Path(cfg.site.dir), Path(cfg.site.cache_dir)
        self.entries_dir = self.cache_dir / "entries"
        self.label_map = label_map_from_cfg(cfg.site)
        check_crop_cfg(cfg.crop)
        self.params_file = str(params_path(cfg.radiomics))
        self.feature_names = extractor_for(self.params_file, crop_spacing_mm(cfg.crop)).names
        self.settings = json.dumps({"crop": OmegaConf.to_container(cfg.crop, resolve=True),
                                    "radiomics": params_digest(cfg.radiomics), "labels": self.label_map}, sort_keys=True)
        self.summary = Summary()
        self.pairings: dict[str, dxa.Pairing] = {}
        self.inputs: dict[str, str] = {}  # study_id -> inputs_sha256 of the files validated

    def check_writable(self) -> None:
        """One clear error before any work when the cache (or its parent, which holds the consolidation's
        temporary folder) cannot be written; a killed earlier run's temporary entries are removed."""
        for folder in (self.entries_dir, self.cache_dir.parent):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as exc:
                raise ConfigError(folder, f"cache folder is not writable ({exc.strerror}); "
                                          "choose another site.cache_dir or fix its permissions") from None
        remove_stale_temporaries(self.entries_dir)

    def report(self, problem: Problem) -> None:
        self.summary.problems.append(problem)

    def quarantine(self, case: str, path: Path | None, reason: str) -> None:
        """Leave a whole study out."""
        self.report(Problem(case, _relative(path, self.site_dir), reason))
        self.summary.quarantined += 1

    def validate(self) -> tuple[list[tuple[Study, str]], pd.DataFrame]:
        """Tables, pairing and every study's headers, before any heavy work: (study, key) of the valid ones."""
        studies, bad_rows = load_studies(self.site_dir, self.cfg.site.studies_table)
        dxa_path = self.site_dir / self.cfg.site.dxa_table
        dxa_table, dxa_problems = dxa.read_dxa(dxa_path)
        studies_df = pd.DataFrame([asdict(s) for s in studies], columns=[f.name for f in fields(Study)])
        self.pairings, pair_problems = dxa.pair_studies(studies_df, dxa_table, int(self.cfg.site.max_dxa_interval_days),
                                                        dxa_path.name, self.cfg.site.studies_table)
        if not dxa_path.is_file():
            self.summary.notes.append(f"no {dxa_path.name}: every study unlabeled")
        elif studies and all(p.dxa is None for p in self.pairings.values()):
            self.summary.notes.append(f"no study paired with a {dxa_path.name} row: every study unlabeled")
        for problem in bad_rows + dxa_problems + pair_problems:
            self.report(problem)
        self.summary.quarantined += len(bad_rows)
        self.summary.dxa_rows_quarantined = sum(p.action == QUARANTINED for p in dxa_problems)
        valid, contents = [], []
        for study in tqdm(studies, desc="validate", unit="study", disable=not self.progress):
            try:
                digests = study_key(study, self.pairings[study.study_id], self.settings)
                if not self.entry(digests.key).is_file():  # an entry exists only for inputs that passed before
                    ct_geometry = ctio.read_geometry(study.ct)
                    ctio.check_same_space(ct_geometry, ctio.read_geometry(study.labels), study.labels)
                self.inputs[study.study_id] = digests.inputs
                valid.append((study, digests.key))
                contents.append((study, digests.ct_content))
            except InputError as exc:
                self.quarantine(study.study_id, exc.path, exc.reason)
        twice = same_scan_twice(contents)
        for study, _ in valid:
            if study.study_id in twice:
                self.quarantine(study.study_id, study.ct, twice[study.study_id])
        return [(s, k) for s, k in valid if s.study_id not in twice], dxa_table

    def entry(self, key: str) -> Path:
        return self.entries_dir / f"{key}.npz"

    def prepare(self, valid: list[tuple[Study, str]]) -> set[str]:
        """Write the entries that do not exist yet (one process per core); the ids of studies that failed."""
        self.entries_dir.mkdir(parents=True, exist_ok=True)
        tasks = [StudyTask(s, self.pairings[s.study_id], self.entry(k), self.label_map, self.cfg.crop, self.params_file)
                 for s, k in valid if not self.entry(k).is_file()]
        self.summary.cached = len(valid) - len(tasks)
        failed = set()
        for task, failure in tqdm(_run(tasks, n_workers(self.cfg.radiomics)), total=len(tasks), desc="prepare",
                                  unit="study", disable=not self.progress):
            if failure is None:
                self.summary.prepared += 1
            else:
                self.quarantine(task.study.study_id, *failure)
                failed.add(task.study.study_id)
        return failed

    def collect(self, done: list[tuple[Study, str]]) -> list[dict[str, Any]]:
        """Load this run's entries in table order (stale entries of other inputs/settings stay out)."""
        parts = []
        for study, key in done:
            entry = _load_entry(self.entry(key))
            for row in entry["rows"]:  # set here, not in the entry: entries written before it get it too
                row["inputs_sha256"] = self.inputs[study.study_id]
                _label(row, self.pairings[study.study_id])
            labels_file = _relative(study.labels, self.site_dir)
            for e in entry["excluded"]:
                self.report(Problem(study.study_id, labels_file, e.reason, e.level, LEVEL_EXCLUDED))
            self.summary.excluded_levels += len(entry["excluded"])
            if not entry["rows"]:
                self.quarantine(study.study_id, study.labels, "no usable vertebra")
                continue
            parts.append(entry)
            self.summary.unlabeled_studies += self.pairings[study.study_id].dxa is None
        return parts


def _consolidate(cache_dir: Path, cfg: DictConfig, parts: list[dict], feature_names: list[str],
                 label_map: dict[str, int], manufacturer: str) -> None:
    size = int(cfg.crop.size)

    def stack(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        return np.concatenate([p[name] for p in parts]) if parts else np.zeros((0, *shape), dtype)

    table = pd.DataFrame([r for p in parts for r in p["rows"]], columns=list(INDEX_COLUMNS))
    manifest = {
        "site": cfg.site.name,
        "crop": OmegaConf.to_container(cfg.crop, resolve=True),
        "crop_spacing_mm": crop_spacing_mm(cfg.crop),
        "label_map": label_map,
        "radiomics_params_sha256": params_digest(cfg.radiomics),
        "dxa_manufacturer": manufacturer,
        "n_studies": int(table["study_id"].nunique()),
    }
    write_site_cache(cache_dir, table, stack("crops", (size,) * 3, np.int16), stack("masks", (size,) * 3, np.uint8),
                     stack("features", (len(feature_names),), np.float32), feature_names, manifest)
