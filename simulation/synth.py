"""Write synthetic hospital sites in the on-disk form a real site brings, plus the hidden truth.

For each configured site and the external site: ``<sites_root>/<site>/`` with studies.csv, dxa.csv,
ct/<study>.nii.gz, labels/<study>.nii.gz (TotalSegmentator `total` ids) and site.yaml; the truth goes
to ``<ground_truth>/`` (``<site>.csv`` per vertebra, ``sites.json`` with the acquisition profiles and
the config the files were made from, written last),
which no site-side code reads. Volumes are rendered in parallel, each from its own seed, so the output
depends on the seed only, not on the number of workers.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from osteo_model.bmd import normalise_manufacturer
from osteo_model.errors import ConfigError
from osteo_model.pools import worker_pool
from osteo_model.radiomics_features import n_workers
from osteofl.simulation.phantom import draw_anatomy, render
from osteofl.simulation.population import SitePopulation, sample_site
from osteofl.simulation.realism import body_volumes_ml, l1_roi_hu, site_realism
from osteofl.simulation.scanners import DIRECTIONS, acquire, render_spacing, site_profile, site_seed

MARKER = ".osteo-synth"
"""Written into every folder this generator owns; a folder without it is never deleted."""


@dataclass
class SiteSummary:
    site: str
    role: str
    studies: int
    with_dxa: int
    paired: int
    prevalence: dict[str, float]
    bytes: int
    realism: dict[str, Any]


def _site_sizes(synth: DictConfig) -> list[tuple[str, str, int, int]]:
    """(site, role, n_labeled, n_unlabeled) for the training sites and the external one."""
    sites = [(str(s), "train", int(synth.labeled_per_site), int(synth.unlabeled_per_site)) for s in synth.sites]
    if synth.external_site:
        sites.append((str(synth.external_site), "external", int(synth.labeled_external), int(synth.unlabeled_external)))
    names = [s[0] for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(None, f"synth: site names must be unique, got {names}")
    if empty := [name for name, _, labeled, unlabeled in sites if min(labeled, unlabeled) < 0 or labeled + unlabeled < 1]:
        raise ConfigError(None, f"synth: site {empty[0]} would have no study (its labeled and unlabeled counts); give it "
                                "some, or leave it out (synth.external_site=null generates no external site)")
    return sites


def sample_populations(cfg: DictConfig) -> list[tuple[str, SitePopulation]]:
    """Every site's population (tables only): (role, population)."""
    return [
        (role, sample_site(cfg.synth, site, site_profile(cfg.synth, site), n_lab, n_unlab,
                           int(cfg.site.max_dxa_interval_days)))
        for site, role, n_lab, n_unlab in _site_sizes(cfg.synth)
    ]


def config_record(cfg: DictConfig) -> dict[str, Any]:
    """What decides the generated files (JSON-ready): the resolved ``synth`` config without its worker
    count (the files do not depend on it) and the CT<->DXA pairing window the populations are drawn with."""
    synth = OmegaConf.to_container(cfg.synth, resolve=True)
    synth.pop("n_jobs", None)
    return json.loads(json.dumps({"synth": synth, "site": {"max_dxa_interval_days": cfg.site.max_dxa_interval_days}}))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()} or {prefix: {}}


def config_change(cfg: DictConfig) -> str | None:
    """Why the sites written earlier do not fit ``cfg`` (None: they do), from the config record that
    ``generate`` writes last into ``<ground_truth>/sites.json``; no record (an older or unfinished
    generation) counts as a change."""
    path = Path(cfg.paths.ground_truth) / "sites.json"
    try:
        recorded = json.loads(path.read_text()).get("config")
    except (OSError, ValueError):
        recorded = None
    if recorded is None:
        return f"{path} records no synth config"
    old, new = _flat(recorded), _flat(config_record(cfg))
    changed = [f"{k.rstrip('.')} {old.get(k)} -> {new.get(k)}"
               for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    if not changed:
        return None
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return f"synth config changed since the sites were generated ({', '.join(changed[:3])}{more})"


def _fresh_dir(path: Path) -> None:
    """Empty ``path`` if osteo-synth wrote it; refuse to touch a folder someone else filled."""
    if path.exists() and any(path.iterdir()) and not (path / MARKER).exists():
        raise ConfigError(path, "exists and was not written by osteo-synth; refusing to overwrite it")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    (path / MARKER).write_text("written by osteo-synth; deleted and rewritten on the next run\n")


def _image(array: np.ndarray, spacing: tuple[float, float, float], origin: np.ndarray, direction: str) -> sitk.Image:
    """Array (z, y, x) in spine-local LPS order -> image stored with the profile's axis signs."""
    signs = DIRECTIONS[direction]
    flip = tuple(slice(None, None, -1) if s < 0 else slice(None) for s in signs[::-1])
    image = sitk.GetImageFromArray(np.ascontiguousarray(array[flip]))
    sz, sy, sx = spacing
    extent = np.array([sx, sy, sz]) * (np.array(array.shape[::-1]) - 1)
    image.SetSpacing((sx, sy, sz))
    image.SetOrigin(tuple(float(o + (e if s < 0 else 0.0)) for o, e, s in zip(origin, extent, signs)))
    image.SetDirection(tuple(np.diag(signs).ravel().tolist()))
    return image


def study_anatomy(synth, study: dict[str, Any], index: int) -> tuple[np.random.Generator, Any]:
    """The study's random stream and the anatomy drawn first from it: what render_study renders, and what
    osteo-synth --realism-only measures without rendering."""
    rng = np.random.default_rng(site_seed(synth.seed, study["site"]) + [3, index])
    return rng, draw_anatomy(rng, study["bone"], study["marrow_hu"], study["calcifications"], study["truncated_level"], synth)


def render_study(task: dict[str, Any]) -> dict[str, Any]:
    """Render one study's CT and label map and write both (worker process)."""
    synth = OmegaConf.create(task["synth"])
    study, profile = task["study"], task["profile"]
    rng, anatomy = study_anatomy(synth, study, task["index"])
    spacing, per_slice = render_spacing(profile)
    b = synth.bone
    hu, labels = render(anatomy, spacing, rng, float(b.tissue_hu),
                        (float(b.fine_wavelength_mm), float(b.coarse_wavelength_mm), float(b.perforation_wavelength_mm)))
    ct, labels = acquire(hu, labels, per_slice, profile, rng)
    l1_hu = l1_roi_hu(ct, anatomy, spacing, per_slice)
    out_spacing = (float(profile["slice_mm"]), spacing[1], spacing[2])
    # Scanner coordinates: the spine sits posterior of the isocentre, the table anywhere along z.
    origin = np.array([anatomy.x_range[0], anatomy.y_range[0] + rng.uniform(30, 60),
                       anatomy.z_range[0] - rng.uniform(150, 400)])
    site_dir = Path(task["site_dir"])
    paths = {"ct": f"ct/{study['study_id']}.nii.gz", "labels": f"labels/{study['study_id']}.nii.gz"}
    for key, array in (("ct", ct), ("labels", labels)):
        sitk.WriteImage(_image(array, out_spacing, origin, profile["direction"]), str(site_dir / paths[key]), True)
    return {**paths, "bytes": sum((site_dir / p).stat().st_size for p in paths.values()), "l1_hu": l1_hu,
            "body_ml": body_volumes_ml(anatomy)}


def _prevalence(studies: pd.DataFrame) -> dict[str, float]:
    cats = studies.loc[studies["paired"], "dxa_category"]
    cats = cats[cats != "unknown"]
    return {c: float((cats == c).mean()) if len(cats) else float("nan") for c in ("normal", "osteopenia", "osteoporosis")}


def _render_all(tasks: list[dict[str, Any]], synth: DictConfig, progress: bool) -> list[dict[str, Any]]:
    """Render every study, in a process pool unless one worker is asked for (same files either way);
    ``synth.n_jobs`` 0 counts the CPUs this process may use, as osteo-prepare does (``taskset``, cgroups)."""
    workers = min(n_workers(synth), max(len(tasks), 1))
    bar = tqdm(total=len(tasks), desc="osteo-synth", unit="study", disable=not progress)
    with bar, (worker_pool(workers) if workers > 1 else contextlib.nullcontext()) as pool:
        done = []
        for result in pool.map(render_study, tasks, chunksize=2) if pool else map(render_study, tasks):
            done.append(result)
            bar.update()
        return done


def generate(cfg: DictConfig, progress: bool = False) -> list[SiteSummary]:
    """Write every site and the ground truth; returns one summary per site."""
    synth = cfg.synth
    populations = sample_populations(cfg)
    truth_dir = Path(cfg.paths.ground_truth)
    sites_root = Path(cfg.paths.sites_root)
    _fresh_dir(truth_dir)
    synth_plain = OmegaConf.to_container(synth, resolve=True)
    tasks, site_rows = [], {}
    for role, pop in populations:
        site_dir = sites_root / pop.site
        _fresh_dir(site_dir)
        (site_dir / "ct").mkdir()
        (site_dir / "labels").mkdir()
        (site_dir / "site.yaml").write_text(
            "label_preset: totalseg_total   # masks from TotalSegmentator `total`\n"
            f"dxa_manufacturer: {normalise_manufacturer(pop.profile['dxa_manufacturer'])}\n")
        pop.dxa.to_csv(site_dir / "dxa.csv", index=False, float_format="%.4f")
        site_rows[pop.site] = len(tasks)
        tasks += [{"synth": synth_plain, "study": study, "profile": pop.profile, "index": i, "site_dir": str(site_dir)}
                  for i, study in enumerate(pop.studies.to_dict("records"))]
    results = _render_all(tasks, synth, progress)
    summaries, sites_json = [], {}
    for role, pop in populations:
        site_dir = sites_root / pop.site
        done = results[site_rows[pop.site]: site_rows[pop.site] + len(pop.studies)]
        studies = pop.studies.assign(
            ct=[r["ct"] for r in done], labels=[r["labels"] for r in done], scanner=pop.profile["scanner"])
        studies[["study_id", "patient_id", "ct_date", "ct", "labels", "scanner"]].to_csv(site_dir / "studies.csv", index=False)
        pop.vertebrae.to_csv(truth_dir / f"{pop.site}.csv", index=False, float_format="%.5f")
        summary = SiteSummary(pop.site, role, len(studies), int(studies["has_dxa"].sum()), int(studies["paired"].sum()),
                              _prevalence(studies), sum(r["bytes"] for r in done),
                              site_realism(pop.studies, pop.dxa, np.array([r["l1_hu"] for r in done]),
                                           np.array([r["body_ml"] for r in done])))
        summaries.append(summary)
        sites_json[pop.site] = {"role": role, "profile": pop.profile, "studies": summary.studies,
                                "with_dxa": summary.with_dxa, "paired": summary.paired, "prevalence": summary.prevalence,
                                "realism": summary.realism}
    record = {"seed": int(synth.seed), "config": config_record(cfg), "sites": sites_json}
    (truth_dir / "sites.json").write_text(json.dumps(record, indent=2))
    return summaries
