"""osteo-predict: the screening report (numbers equal osteo-eval's, exclusions, refusals, files, HTML)."""
from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from omegaconf import OmegaConf

from cache_factory import FEATURE_NAMES, make_site_cache
from conftest import LEVEL_Z0
from model_helpers import TINY
from osteo_model.bmd import category_name, region_sd_factor, reported_category
from osteo_model.cache import SiteCache
from osteo_model.central import build_site_models, checkpoint_payload
from osteo_model.checkpoints import save_model_state
from osteo_model.cli.predict import main as predict_main
from osteo_model.config import compose
from osteo_model.constants import LEVEL_REFERENCE_BMD, LEVELS, MIN_LEVELS_FOR_DIAGNOSIS, YOUNG_ADULT_REFERENCE
from osteo_model.crops import crop_spacing_mm
from osteo_model.errors import ConfigError
from osteo_model.evaluate import evaluate_checkpoint
from osteo_model.central import load_sites
from osteo_model.predict import run_predict
from osteo_model.prepare import prepare_site
from osteo_model.radiomics_features import extractor_for, params_path
from osteo_model.screening import Reference, StudyInput, screen

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "totalseg_example"


def cfg_for(root: Path, site: str, *extra: str):
    return compose([f"paths.root={root}", f"site.name={site}", "device=cpu", "radiomics.n_jobs=1", "predict.n_jobs=1",
                    "eval.plots=false", *TINY, *extra])


def save_model(path: Path, cfg, sites: dict[str, str], names: list[str], crop: dict | None, seed: int = 0) -> Path:
    """An untrained but non-degenerate model file (central checkpoint format): random local residuals."""
    models = build_site_models(cfg, len(names), sites)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in models.values():
            for name, p in m.named_parameters():
                if name.startswith(("local_expert.", "calibration.", "heads.")):
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return save_model_state(path, checkpoint_payload(models, cfg, names, crop))


def real_names(cfg) -> list[str]:
    return extractor_for(str(params_path(cfg.radiomics)), crop_spacing_mm(cfg.crop)).names


def crop_of(cfg) -> dict:
    return {k: float(cfg.crop[k]) for k in ("size", "fov_mm", "trabecular_erosion_mm")}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def read_report(out: Path) -> tuple[pd.DataFrame, dict]:
    return pd.read_csv(out / "report.csv", dtype={"study_id": str}), json.loads((out / "report.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("site_in_model", [True, False], ids=["own-site", "new-site"])
def test_predictions_equal_osteo_eval(tmp_path, site_in_model):
    cfg = cfg_for(tmp_path, "site_u", "predict.min_val_patients=1")
    make_site_cache(tmp_path / "data/cache/site_u", site="site_u", n_patients=5, labeled_frac=0.0, size=16)
    sites = {"site_u": "hologic"} if site_in_model else {"site_a": "ge_lunar"}
    model = save_model(tmp_path / "m.pt", cfg, sites, FEATURE_NAMES, None)
    from osteo_model.checkpoints import load_model_state

    evaluate_checkpoint(load_model_state(model), cfg, load_sites(cfg, ["site_u"]), "test", tmp_path / "eval", "m")
    ev = pd.read_csv(tmp_path / "eval/predictions_m_site_u.csv", dtype={"study_id": str})
    out = tmp_path / "report"
    run_predict(cfg, model, out_dir=out, progress=False)
    rep, js = read_report(out)
    levels = rep[rep["level"] != "patient"].merge(ev, on=["study_id", "level"], validate="one_to_one")
    assert len(levels) == len(ev) == 20
    np.testing.assert_allclose(levels["bmd"], levels["bmd_pred"], rtol=1e-5)
    np.testing.assert_allclose(levels["sbmd"], levels["sbmd_pred"], rtol=1e-5)
    # each vertebra's T-score on its own level's reference, as DXA reports and the training labels have it
    mean, sd = YOUNG_ADULT_REFERENCE[js["studies"][0]["manufacturer"]]
    table = SiteCache.open(tmp_path / "data/cache/site_u").table
    sex = dict(zip(table["study_id"], table["sex"]))
    share = [np.mean([r[lv] / np.mean(list(r.values())) for r in (
        [LEVEL_REFERENCE_BMD[sex[s]]] if sex[s] in LEVEL_REFERENCE_BMD else LEVEL_REFERENCE_BMD.values())])
        for s, lv in zip(levels["study_id"], levels["level"])]
    one_level_sd = sd * region_sd_factor(1)  # one vertebra's young-adult SD (clinical.md: 0.12-0.13 on Hologic's scale)
    np.testing.assert_allclose(levels["t_score"], (levels["bmd_pred"] - mean * np.array(share)) / one_level_sd, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(levels["t_score"], levels["t_pred"], rtol=1e-5, atol=1e-5)  # osteo-eval's, the same
    np.testing.assert_allclose(levels["p_osteoporosis_x"], levels["p_osteoporosis_y"], rtol=1e-5)  # report, eval
    assert (levels["category"] == [category_name(reported_category(t)) for t in levels["t_score"]]).all()
    assert js["model"]["local_part"].startswith("site_u" if site_in_model else "shared weights only")
    # Patient row = mean of the four levels' BMD (ISCD), T-score on the site's (Hologic) reference.
    first = rep[rep["study_id"] == "site_u-s000"]
    patient = first[first["level"] == "patient"].iloc[0]
    assert patient["bmd"] == pytest.approx(first[first["level"] != "patient"]["bmd"].mean(), rel=1e-6)
    # No DXA at this site: no interval, and the report says why (no validation patients).
    assert np.isnan(patient["t_low"]) and "no validation patients" in patient["interval_note"]
    # The site folder does not exist: numbers without an image, and the report says so.
    assert all(s["image_note"] for s in js["studies"])


def test_interval_from_validation_residuals(tmp_path):
    cfg = cfg_for(tmp_path, "site_a", "predict.min_val_patients=2", "predict.interval_coverage=0.8")
    make_site_cache(tmp_path / "data/cache/site_a", site="site_a", n_patients=24, size=16)
    model = save_model(tmp_path / "m.pt", cfg, {"site_a": "hologic"}, FEATURE_NAMES, None)
    out = tmp_path / "report"
    run_predict(cfg, model, study_ids=["site_a-s000"], out_dir=out, progress=False)
    rep, js = read_report(out)
    from osteo_model.central import models_from_checkpoint
    from osteo_model.checkpoints import load_model_state
    from osteo_model.dataset import load_site_data
    from osteo_model.metrics import patient_level
    from osteo_model.training import predict

    data = load_site_data(tmp_path / "data/cache/site_a", cfg)
    net = models_from_checkpoint(load_model_state(model), cfg)["site_a"]
    val = data.cache.table.iloc[data.splits["val"]]
    pat = patient_level(predict(net, data, data.splits["val"], "cpu", 64)["bmd"], val)
    lo, hi = np.quantile(pat["pred"] - pat["true"], [0.1, 0.9])
    patient = rep[rep["level"] == "patient"].iloc[0]
    from osteo_model.bmd import t_score

    assert patient["t_low"] == pytest.approx(t_score(patient["bmd"] - hi, "hologic"), rel=1e-6)
    assert patient["t_high"] == pytest.approx(t_score(patient["bmd"] - lo, "hologic"), rel=1e-6)
    assert f"{val['patient_id'].nunique()} validation patients" in patient["interval_note"]
    # Too few validation patients for the setting: no interval, and why.
    cfg_strict = cfg_for(tmp_path, "site_a", "predict.min_val_patients=99")
    run_predict(cfg_strict, model, study_ids=["site_a-s000"], out_dir=tmp_path / "strict", progress=False)
    strict, _ = read_report(tmp_path / "strict")
    assert strict["t_low"].isna().all() and "need 99" in strict[strict["level"] == "patient"].iloc[0]["interval_note"]


def test_out_of_distribution_flags(tmp_path):
    make_site_cache(tmp_path / "c", site="s", n_patients=2, labeled_frac=0.0, size=16)
    from osteo_model.cache import SiteCache

    cache = SiteCache.open(tmp_path / "c")
    cfg = cfg_for(tmp_path, "s")
    model = build_site_models(cfg, len(FEATURE_NAMES), {"s": "hologic"})["s"]
    feats = np.asarray(cache.features, np.float64)
    ref = Reference(np.zeros(0), np.zeros(0), 0, frozenset({"Known CT"}), (0.0, 1.0),
                    (feats.mean(0), np.full(feats.shape[1], 1e-3)), 0.9, 5)
    study = StudyInput("x", cache, np.arange(4), {}, scanner="Other CT")
    (report,) = screen(model, [study], ref, cfg.predict, "cpu")
    assert any("scanner 'Other CT' not seen" in f for f in report.flags)
    assert all(any("outside the site's training range" in f for f in lv.flags) for lv in report.levels)
    assert all(any("texture unlike training" in f for f in lv.flags) for lv in report.levels)


def test_a_level_without_a_finite_prediction_is_not_evaluable_and_the_report_is_still_drawn(tmp_path):
    """A model that predicts NaN (a file with such weights is refused when loaded; this one diverged in
    memory) must not mark its levels evaluable; a category the renderers do not colour must not stop them."""
    from osteo_model import report_html, report_png
    from osteo_model.screening import HU_RULE_NAMES

    make_site_cache(tmp_path / "c", site="s", n_patients=1, labeled_frac=0.0, size=16)
    cfg = cfg_for(tmp_path, "s")
    model = build_site_models(cfg, len(FEATURE_NAMES), {"s": "hologic"})["s"]
    with torch.no_grad():
        for param in model.parameters():
            param.fill_(float("nan"))
    ref = Reference(np.zeros(0), np.zeros(0), 0, frozenset(), None, None, 0.9, 5)
    (report,) = screen(model, [StudyInput("x", SiteCache.open(tmp_path / "c"), np.arange(4), {})], ref, cfg.predict, "cpu")
    assert [(lv.evaluable, lv.reason, lv.category) for lv in report.levels] == [
        (False, "model gave no finite prediction", "")] * 4
    assert all(np.isfinite(lv.hu_mean) for lv in report.levels)  # measured, not predicted: the L1-HU rule stands
    assert not report.patient.evaluable and report.patient.l1_hu_rule in HU_RULE_NAMES
    report.levels[0].evaluable, report.levels[0].category = True, "unknown"
    report_html.write_index(tmp_path / "index.html", [report], "s", "model")
    report_png.render_study_png(tmp_path / "x.png", report, None, None, {}, "model")
    assert (tmp_path / "x.png").stat().st_size > 10_000


def _phantom_study(tmp_path: Path, spine_phantom, name: str, drop_l4: bool, truncate_l1: bool, soft_l2: bool):
    ct, labels = spine_phantom(levels=("L1", "L2", "L3") if drop_l4 else LEVELS)
    ct_arr, lab_arr = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(labels)
    if soft_l2:  # a label on soft tissue: the mask cannot be a vertebra
        z = slice(LEVEL_Z0["L2"], LEVEL_Z0["L2"] + 10)
        ct_arr[z][lab_arr[z] > 0] = 40
    if truncate_l1:  # the scan ends inside L1
        ct_arr, lab_arr = ct_arr[: LEVEL_Z0["L1"] + 5], lab_arr[: LEVEL_Z0["L1"] + 5]
    paths = []
    for arr, kind in ((ct_arr, "ct"), (lab_arr, "seg")):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(ct.GetSpacing())
        img.SetOrigin(ct.GetOrigin())  # cutting the top slices keeps the origin
        paths.append(tmp_path / f"{name}_{kind}.nii.gz")
        sitk.WriteImage(img, str(paths[-1]))
    return paths


def test_new_ct_exclusions_and_patient_summary(tmp_path, spine_phantom):
    cfg = cfg_for(tmp_path, "site_n")
    model = save_model(tmp_path / "m.pt", cfg, {"site_n": "hologic"}, real_names(cfg), crop_of(cfg))
    bad = _phantom_study(tmp_path, spine_phantom, "bad", drop_l4=True, truncate_l1=True, soft_l2=True)
    ok = _phantom_study(tmp_path, spine_phantom, "ok", drop_l4=True, truncate_l1=False, soft_l2=False)
    out = tmp_path / "report"
    run_predict(cfg, model, new_cts=[tuple(bad), tuple(ok), (tmp_path / "nothing.nii.gz", bad[1])], out_dir=out,
                progress=False)
    rep, js = read_report(out)
    by = {(r.study_id, r.level): r for r in rep.itertuples()}
    assert "truncated" in by["bad_ct", "L1"].reason
    assert "implausible" in by["bad_ct", "L2"].reason and "not bone" in by["bad_ct", "L2"].reason
    assert "missing" in by["bad_ct", "L4"].reason
    assert by["bad_ct", "L3"].evaluable and np.isfinite(by["bad_ct", "L3"].bmd)
    bad_patient = by["bad_ct", "patient"]
    assert not bad_patient.evaluable and np.isnan(bad_patient.bmd)
    assert "not evaluable: 1 evaluable level(s) (L3)" in bad_patient.reason and f"at least {MIN_LEVELS_FOR_DIAGNOSIS}" in bad_patient.reason
    # Only L4 missing: the patient value is the mean of L1-L3, and the L1-HU rule is given beside it.
    assert [by["ok_ct", lv].evaluable for lv in LEVELS] == [True, True, True, False]
    assert by["ok_ct", "patient"].bmd == pytest.approx(np.mean([by["ok_ct", lv].bmd for lv in ("L1", "L2", "L3")]), rel=1e-6)
    assert by["ok_ct", "patient"].l1_hu_rule.startswith(("normal", "osteopenia", "osteoporosis"))
    assert "L1 not evaluable" in by["bad_ct", "patient"].l1_hu_rule
    # A CT that cannot be read is recorded with the reason, the batch carries on.
    assert "not found" in by["nothing", "L1"].reason
    assert {s["study_id"] for s in js["studies"]} == {"bad_ct", "ok_ct", "nothing"}
    assert all((out / s["image"]).stat().st_size > 10_000 for s in js["studies"])


def test_new_cts_of_one_file_name_get_distinct_ids_and_the_report_names_their_files(tmp_path, spine_phantom):
    """TotalSegmentator writes every case as <case>/ct.nii.gz: each new CT gets as many parent folders in its
    id as tell it apart, the report names its files, and a failure names the file that failed."""
    from osteo_model.predict import new_ct_ids

    cfg = cfg_for(tmp_path, "site_n")
    model = save_model(tmp_path / "m.pt", cfg, {"site_n": "hologic"}, real_names(cfg), crop_of(cfg))
    ct, labels = spine_phantom()
    cts = [(tmp_path / case / "ct.nii.gz", tmp_path / case / "seg.nii.gz") for case in "ab"]
    for ct_path, labels_path in cts:
        ct_path.parent.mkdir()
        sitk.WriteImage(ct, str(ct_path))
        sitk.WriteImage(labels, str(labels_path))
    missing = (tmp_path / "c" / "ct.nii.gz", cts[0][1])
    run_predict(cfg, model, new_cts=[*cts, missing], out_dir=tmp_path / "r", progress=False)
    rep, js = read_report(tmp_path / "r")
    assert [(s["study_id"], s["ct"], s["labels"]) for s in js["studies"]] == [
        (sid, str(ct), str(labels)) for sid, (ct, labels) in zip(("a/ct", "b/ct", "c/ct"), [*cts, missing])]
    assert rep.groupby("study_id")["ct"].first().to_dict() == {"a/ct": str(cts[0][0]), "b/ct": str(cts[1][0]),
                                                               "c/ct": str(missing[0])}
    failed = rep[rep["study_id"] == "c/ct"].set_index("level")["reason"]
    assert (failed[list(LEVELS)] == f"{missing[0]}: file not found").all()
    assert failed["patient"] == f"not evaluable: {missing[0]}: file not found"
    # Parents until the ids differ, also from the report's other ids; the same file twice is numbered.
    assert new_ct_ids(["/x/a/ct.nii.gz", "/y/a/ct.nii.gz", "/x/a/ct.nii.gz", "/z/scan"], taken={"scan"}) == [
        "x/a/ct", "y/a/ct", "x/a/ct#2", "z/scan"]


def test_a_study_quarantined_as_a_whole_keeps_osteo_prepares_reasons(tmp_path):
    from osteo_model.quarantine import LEVEL_EXCLUDED, Problem, write_quarantine_csv

    cfg = cfg_for(tmp_path, "site_a")
    cache = make_site_cache(tmp_path / "data/cache/site_a", site="site_a", n_patients=2, size=16)
    anatomy = "implausible anatomy: L3 lies above L2 (L1 to L4 run head to feet); wrong label map or preset?"
    write_quarantine_csv(cache / "quarantine.csv", [
        *(Problem("swapped", "labels/swapped.nii.gz", anatomy, lv, LEVEL_EXCLUDED) for lv in LEVELS),
        Problem("swapped", "labels/swapped.nii.gz", "no usable vertebra")])
    model = save_model(tmp_path / "m.pt", cfg, {"site_a": "hologic"}, FEATURE_NAMES, None)
    run_predict(cfg, model, study_ids=["swapped", "never"], out_dir=tmp_path / "r", progress=False)
    rep, _ = read_report(tmp_path / "r")
    reason = {(r.study_id, r.level): r.reason for r in rep.itertuples()}
    assert [reason["swapped", lv] for lv in LEVELS] == [anatomy] * 4
    assert reason["swapped", "patient"] == "not evaluable: no usable vertebra"
    assert reason["never", "patient"] == "not evaluable: study not prepared: run osteo-prepare for this site"


@pytest.mark.parametrize("what", ["crop", "features"])
def test_model_with_other_settings_is_refused(tmp_path, capsys, what):
    cfg = cfg_for(tmp_path, "site_a")
    make_site_cache(tmp_path / "data/cache/site_a", site="site_a", n_patients=2, size=16)
    names = FEATURE_NAMES if what == "crop" else [*FEATURE_NAMES[:-1], "original_glcm_Other"]
    crop = {"size": 32.0, "fov_mm": 48.0, "trabecular_erosion_mm": 3.0} if what == "crop" else None
    model = save_model(tmp_path / "m.pt", cfg, {"site_a": "hologic"}, names, crop)
    with pytest.raises(ConfigError, match="crop" if what == "crop" else "feature set"):
        run_predict(cfg, model, out_dir=tmp_path / "r", progress=False)
    code = predict_main(["--site", "site_a", "--model", str(model), "--out", str(tmp_path / "r2"), "--no-progress",
                         f"paths.root={tmp_path}", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error:") and "\n" not in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()


class _Page(HTMLParser):
    """Checks nesting while it collects cards and image sources."""

    VOID = {"meta", "img", "br", "hr", "input", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.cards: list[dict[str, str]] = []
        self.images: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "card" in a.get("class", ""):
            self.cards.append(a)
        if tag == "img":
            self.images.append(a["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")


def test_prepared_site_report_files_and_html(tmp_path, make_site, prepare_cfg):
    site = make_site(n_labeled=2, n_unlabeled=1)
    # Study s002 has no L4: its level says why (from osteo-prepare's quarantine.csv).
    labels = sitk.ReadImage(str(site / "labels/s002.nii.gz"))
    arr = sitk.GetArrayFromImage(labels)
    arr[arr == 28] = 0
    out_labels = sitk.GetImageFromArray(arr)
    out_labels.CopyInformation(labels)
    sitk.WriteImage(out_labels, str(site / "labels/s002.nii.gz"))
    pcfg = prepare_cfg(site)
    prepare_site(pcfg, progress=False)
    cfg = cfg_for(tmp_path, site.name, f"site.dir={site}", f"site.cache_dir={pcfg.site.cache_dir}")
    model = save_model(tmp_path / "model.pt", cfg, {site.name: "hologic"}, real_names(cfg), crop_of(cfg))
    # The CT of s001 vanished after preparation: numbers still, image unavailable.
    (site / "ct/s001.nii.gz").unlink()
    before = files_under(tmp_path)
    out = tmp_path / "out" / "report"
    code = predict_main(["--site", site.name, "--model", str(model), "--out", str(out), "--no-progress",
                         f"paths.root={tmp_path}", f"site.dir={site}", f"site.cache_dir={pcfg.site.cache_dir}",
                         "radiomics.n_jobs=1", *TINY])
    assert code == 0
    written = files_under(tmp_path) - before
    assert written and all(out in p.parents for p in written)  # nothing outside the output folder
    rep, js = read_report(out)
    assert json.loads((out / "report.json").read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert len(rep) == 3 * 5 and js["use"].lower().startswith("research use only")
    assert js["model"]["kind"] == "central" and js["model"]["run_id"]
    row = rep[(rep["study_id"] == "s002") & (rep["level"] == "L4")].iloc[0]
    assert not row["evaluable"] and "missing" in row["reason"]
    notes = {s["study_id"]: s["image_note"] for s in js["studies"]}
    assert "unreadable" in notes["s001"] or "not found" in notes["s001"]
    assert notes["s000"] == "" and notes["s002"] == ""
    ids = set(rep["study_id"])
    assert not any(pid in (out / f).read_text(encoding="utf-8") for pid in ("p000", "p001", "p002")
                   for f in ("report.csv", "report.json", "index.html"))  # no patient ids added
    html = (out / "index.html").read_text(encoding="utf-8")
    page = _Page()
    page.feed(html)
    page.close()
    assert not page.errors and not page.stack
    assert sorted(c["data-study"] for c in page.cards) == sorted(ids)
    assert len(page.images) == 3 and all((out / src).is_file() for src in page.images)
    ts = [float(c["data-t"]) for c in page.cards if c["data-t"] != "NaN"]
    assert ts == sorted(ts)  # lowest T first
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser:  # a real browser, where the machine has one
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--dump-dom", (out / "index.html").as_uri()],
                             capture_output=True, text=True, timeout=60).stdout
        assert dom.count('class="card"') == 3


def test_a_prepared_study_whose_files_changed_since_preparation_gets_no_image(tmp_path, make_site, prepare_cfg,
                                                                             spine_phantom):
    """Its numbers are the cache's, from the files osteo-prepare read: today's files (another scan written
    over them) would put another spine beside them."""
    from osteo_model.predict import CHANGED_NOTE, UNCHECKED_NOTE
    from osteo_model.prepare import inputs_sha256

    site = make_site(n_labeled=1, n_unlabeled=1)
    pcfg = prepare_cfg(site)
    prepare_site(pcfg, progress=False)
    cfg = cfg_for(tmp_path, site.name, f"site.dir={site}", f"site.cache_dir={pcfg.site.cache_dir}")
    model = save_model(tmp_path / "model.pt", cfg, {site.name: "hologic"}, real_names(cfg), crop_of(cfg))
    for image, kind in zip(spine_phantom(trabecular_hu=260.0, seed=9), ("ct", "labels")):
        sitk.WriteImage(image, str(site / kind / "s000.nii.gz"))

    def notes(name: str) -> dict[str, str]:
        run_predict(cfg, model, out_dir=tmp_path / name, progress=False)
        rep, js = read_report(tmp_path / name)
        assert rep.loc[rep["level"] != "patient", "bmd"].notna().all()  # the numbers stay: they are the cache's
        return {s["study_id"]: s["image_note"] for s in js["studies"]}

    assert notes("changed") == {"s000": CHANGED_NOTE, "s001": ""}
    # A cache prepared before the digest was recorded: the image, with a note that it was not checked.
    index = Path(pcfg.site.cache_dir) / "index.csv"
    pd.read_csv(index).drop(columns="inputs_sha256").to_csv(index, index=False)
    assert notes("old") == {"s000": UNCHECKED_NOTE, "s001": UNCHECKED_NOTE}
    # osteo-prepare records it again, also for the study it skips as cached.
    assert prepare_site(pcfg, progress=False).cached == 1
    recorded = pd.read_csv(index).groupby("study_id")["inputs_sha256"].unique()
    assert {s: list(v) for s, v in recorded.items()} == {
        s: [inputs_sha256(site / "ct" / f"{s}.nii.gz", site / "labels" / f"{s}.nii.gz")] for s in ("s000", "s001")}


@pytest.mark.slow
@pytest.mark.skipif(not (REAL / "ct.nii.gz").is_file(), reason="../shared/data/real not present")
def test_real_example_gets_a_complete_report(tmp_path):
    cfg = cfg_for(tmp_path, "real", "site.label_preset=totalseg_total")
    model = save_model(tmp_path / "m.pt", cfg, {"real": "hologic"}, real_names(cfg), crop_of(cfg))
    out = tmp_path / "report"
    run_predict(cfg, model, new_cts=[(REAL / "ct.nii.gz", REAL / "seg_total.nii.gz")], out_dir=out, progress=False)
    rep, js = read_report(out)
    spine = json.loads((REAL / "spine_report.json").read_text(encoding="utf-8"))["results"]
    (study,) = js["studies"]
    assert study["study_id"] == "ct" and study["image"] and not study["image_note"]
    assert (out / study["image"]).stat().st_size > 50_000
    for lv in study["levels"]:
        assert lv["evaluable"] and np.isfinite(lv["bmd"]) and 0 <= lv["p_osteoporosis"] <= 1
        assert abs(lv["hu_median"] - spine[f"vertebrae_{lv['level']}_intensity_median"]) < 20
    p = study["patient"]
    assert p["evaluable"] and p["levels_used"] == list(LEVELS) and p["category"] in ("normal", "osteopenia", "osteoporosis")
    assert p["l1_hu_rule"] and p["l1_totalseg_flag"] and "no validation patients" in p["interval_note"]


def test_default_model_is_the_sites_own(tmp_path, capsys):
    cfg = cfg_for(tmp_path, "site_a")
    make_site_cache(tmp_path / "data/cache/site_a", site="site_a", n_patients=3, size=16)
    code = predict_main(["--site", "site_a", "--no-progress", f"paths.root={tmp_path}", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "site_model.pt" in err and "\n" not in err  # no model yet: one line, no report
    assert not (tmp_path / "outputs").exists()
    from osteo_model.checkpoints import save_site_model

    net = build_site_models(cfg, len(FEATURE_NAMES), {"site_a": "hologic"})["site_a"]
    card = {"run_id": "fed-7", "round": 12, "n_sites": 3, "epsilon_spent": 2.5, "date": "2026-01-02T03:04:05+00:00"}
    save_site_model(cfg.site.state_dir, net, site="site_a", feature_names=FEATURE_NAMES,
                    model_cfg=OmegaConf.to_container(cfg.model, resolve=True),
                    crop=None, card=card)
    # Hydra overrides right after the study ids are overrides, not ids.
    assert predict_main(["--site", "site_a", "--no-progress", "--study", "site_a-s001", f"paths.root={tmp_path}", *TINY]) == 0
    out = Path(cfg.predict.out_dir)
    _, js = read_report(out)
    assert [s["study_id"] for s in js["studies"]] == ["site_a-s001"]
    assert {k: js["model"][k] for k in ("kind", "run_id", "round", "n_sites", "epsilon")} == {
        "kind": "site", "run_id": "fed-7", "round": 12, "n_sites": 3, "epsilon": 2.5}
    assert "site_a's own device expert" in js["model"]["local_part"]
    html = (out / "index.html").read_text(encoding="utf-8")
    assert "run fed-7, round 12, 3 site(s)" in html and "ε 2.50" in html and "Research use only" in html


def test_federated_checkpoint_gives_shared_weights_only(tmp_path):
    from osteo_model.checkpoints import features_sha256, model_meta, write_npz
    from osteo_model.model import shared_state

    cfg = cfg_for(tmp_path, "site_a", "crop.size=16", "crop.fov_mm=16")
    make_site_cache(tmp_path / "data/cache/site_a", site="site_a", n_patients=3, size=16)
    net = build_site_models(cfg, len(FEATURE_NAMES), {"site_a": "hologic"})["site_a"]
    arrays = {k: v.numpy() for k, v in shared_state(net).items()}
    meta = {**model_meta(cfg, len(FEATURE_NAMES), features_sha256(FEATURE_NAMES)), "run_id": "fl-run", "round": 4,
            "n_sites": 3}
    npz = write_npz(tmp_path / "round-0004.npz", arrays, {}, meta)
    run_predict(cfg, npz, out_dir=tmp_path / "r", progress=False)
    rep, js = read_report(tmp_path / "r")
    assert js["model"]["kind"] == "federated" and js["model"]["round"] == 4 and js["model"]["run_id"] == "fl-run"
    assert js["model"]["local_part"].startswith("shared weights only")
    assert rep["evaluable"].all() and np.isfinite(rep.loc[rep["level"] != "patient", "bmd"]).all()
    # The same file with another feature set's hash is refused.
    write_npz(npz, arrays, {}, {**meta, "features_sha256": features_sha256(["other"])})
    with pytest.raises(ConfigError, match="feature set"):
        run_predict(cfg, npz, out_dir=tmp_path / "r2", progress=False)


def test_iscd_adjacent_outlier_is_flagged_not_excluded():
    from osteo_model.screening import LevelResult, flag_outlier_levels

    t = {"L1": -1.0, "L2": -2.5, "L3": -1.2, "L4": -1.4}
    levels = [LevelResult(lv, True, t_score=v) for lv, v in t.items()]
    flag_outlier_levels(levels)
    flagged = [lv.level for lv in levels if lv.flags]
    assert flagged == ["L2"] and "L1 and L3" in levels[1].flags[0]
    assert all(lv.evaluable for lv in levels)
    # An end level against its one evaluable neighbour and the others' median; a level without an evaluable
    # neighbour is not judged.
    levels = [LevelResult("L1", True, t_score=0.5), LevelResult("L2", True, t_score=-1.0),
              LevelResult("L3", False), LevelResult("L4", True, t_score=-3.0)]
    flag_outlier_levels(levels)
    assert [bool(lv.flags) for lv in levels] == [True, False, False, False]


def _interval_only_where_the_split_stayed(tmp_path: Path, model: Path | None) -> None:
    """site_a's report with its split as the model trained on it (an interval) and moved (none, and why)."""
    notes = {}
    for name, extra in (("same", ()), ("moved", ("data.split_seed=5",))):
        run_predict(cfg_for(tmp_path, "site_a", "predict.min_val_patients=2", *extra), model,
                    study_ids=["site_a-s000"], out_dir=tmp_path / name, progress=False)
        rep, _ = read_report(tmp_path / name)
        notes[name] = rep[rep["level"] == "patient"].iloc[0]
    assert np.isfinite(notes["same"]["t_low"]) and "validation patients of this site" in notes["same"]["interval_note"]
    assert np.isnan(notes["moved"]["t_low"]) and "not those held out when the model trained" in notes["moved"]["interval_note"]


def test_no_interval_where_the_validation_patients_are_not_those_the_model_was_selected_on(tmp_path):
    """A site model's card records its validation patients. After the hospital changes its split (or
    re-prepares with new patients), some validation patients may have been trained on: their residuals
    would give too narrow an interval, so none is given, and the report says why."""
    from osteo_model.checkpoints import VAL_PATIENTS, save_site_model
    from osteo_model.dataset import load_site_data, patients_sha256

    cfg = cfg_for(tmp_path, "site_a", "predict.min_val_patients=2")
    make_site_cache(tmp_path / "data/cache/site_a", site="site_a", n_patients=24, size=16)
    net = build_site_models(cfg, len(FEATURE_NAMES), {"site_a": "hologic"})["site_a"]
    selected_on = patients_sha256(load_site_data(cfg.site.cache_dir, cfg), "val")
    save_site_model(cfg.site.state_dir, net, site="site_a", feature_names=FEATURE_NAMES,
                    model_cfg=OmegaConf.to_container(cfg.model, resolve=True), crop=None,
                    card={"run_id": "fed-1", VAL_PATIENTS: selected_on})
    _interval_only_where_the_split_stayed(tmp_path, None)


def test_a_central_checkpoint_knows_each_sites_validation_patients(tmp_path):
    """osteo-train's checkpoint records every training site's validation patients, so osteo-predict can
    tell a site whose split moved since central training (its new validation patients may have been
    trained on: no interval) from one whose split did not."""
    from osteo_model.central import CHECKPOINT, train_central
    from osteo_model.checkpoints import VAL_PATIENTS, load_model_state
    from osteo_model.dataset import load_site_data, patients_sha256

    cfg = cfg_for(tmp_path, "site_a", "predict.min_val_patients=2", "train.ssl_epochs=0", "train.task_epochs=1")
    for site in ("site_a", "site_b"):
        make_site_cache(tmp_path / "data/cache" / site, site=site, n_patients=24, size=16)
    datas = {s: load_site_data(tmp_path / "data/cache" / s, cfg) for s in ("site_a", "site_b")}
    train_central(cfg, datas, tmp_path / "central", log=lambda _: None)
    ckpt = tmp_path / "central" / CHECKPOINT
    assert load_model_state(ckpt)["card"][VAL_PATIENTS] == {s: patients_sha256(d, "val") for s, d in datas.items()}
    _interval_only_where_the_split_stayed(tmp_path, ckpt)


def test_a_pinned_split_keeps_the_interval_when_new_patients_arrive(tmp_path):
    """The site re-prepares its cache with new patients after training. Its pinned split keeps every
    patient the model saw where it was, so the validation residuals still come from patients it never
    trained on and the interval stays; without the pin the split reshuffles and there is none."""
    from cache_factory import copy_cache
    from osteo_model.cache import SiteCache
    from osteo_model.checkpoints import SPLIT_PIN, VAL_PATIENTS, save_site_model
    from osteo_model.dataset import SPLIT_FILE, load_site_data, patients_sha256

    cfg = cfg_for(tmp_path, "site_a", "predict.min_val_patients=2")
    cache, grown = Path(cfg.site.cache_dir), tmp_path / "grown"
    make_site_cache(grown, site="site_a", n_patients=60, size=16, labeled_frac=1.0)
    copy_cache(grown, cache, SiteCache.open(grown).table["patient_id"].isin([f"site_a-p{i:03d}" for i in range(30)]).to_numpy())
    pin = Path(cfg.site.state_dir) / SPLIT_FILE
    data = load_site_data(cache, cfg, pin=pin, write_pin=True)  # as the site trained
    net = build_site_models(cfg, len(FEATURE_NAMES), {"site_a": "hologic"})["site_a"]
    save_site_model(cfg.site.state_dir, net, site="site_a", feature_names=FEATURE_NAMES,
                    model_cfg=OmegaConf.to_container(cfg.model, resolve=True), crop=None,
                    card={"run_id": "fed-1", VAL_PATIENTS: patients_sha256(data, "val"), SPLIT_PIN: data.split_id})
    copy_cache(grown, cache, np.arange(len(SiteCache.open(grown))))  # re-prepared: 30 more patients
    assert patients_sha256(load_site_data(cache, cfg, pin=pin), "val") != patients_sha256(data, "val")  # new ones in val
    notes = {}
    for name in ("pinned", "unpinned"):
        if name == "unpinned":
            pin.unlink()
        run_predict(cfg, None, study_ids=["site_a-s000"], out_dir=tmp_path / name, progress=False)
        rep, _ = read_report(tmp_path / name)
        notes[name] = rep[rep["level"] == "patient"].iloc[0]
    assert np.isfinite(notes["pinned"]["t_low"]) and "validation patients of this site" in notes["pinned"]["interval_note"]
    assert np.isnan(notes["unpinned"]["t_low"]) and "not those held out when the model trained" in notes["unpinned"]["interval_note"]


@pytest.mark.parametrize("age, sex", [(35.0, "male"), (65.0, "female"), (float("nan"), "")])
def test_who_categories_from_age_50_and_the_report_says_which_reference(tmp_path, age, sex):
    """clinical.md: the WHO categories are for postmenopausal women and men >= 50; younger patients need a
    Z-score. The report says the value is a CT estimate of DXA, which reference its T-score is on, and,
    where the age is unknown, who the category is for."""
    from html import escape

    from osteo_model import report_html
    from osteo_model.screening import NO_WHO_CATEGORY, SCREENING_ESTIMATE

    make_site_cache(tmp_path / "c", site="s", n_patients=1, labeled_frac=1.0, size=16)
    cfg = cfg_for(tmp_path, "s")
    model = build_site_models(cfg, len(FEATURE_NAMES), {"s": "hologic"})["s"]
    cache = SiteCache.open(tmp_path / "c")
    cache.table["age"], cache.table["sex"] = age, sex
    ref = Reference(np.zeros(0), np.zeros(0), 0, frozenset(), None, None, 0.9, 5)
    (report,) = screen(model, [StudyInput("x", cache, np.arange(4), {})], ref, cfg.predict, "cpu")
    p = report.patient
    assert p.evaluable and np.isfinite(p.t_score) and "hologic young-adult reference of L1-L4" in p.t_note
    categories = [p.category, *(lv.category for lv in report.levels)]
    if age < 50:
        assert categories == [NO_WHO_CATEGORY] * 5 and "age 35" in p.t_note and "Z-score" in p.t_note
    else:
        assert set(categories) <= {"normal", "osteopenia", "osteoporosis"}
        assert p.category == category_name(int(reported_category(p.t_score)))
    assert ("age unknown" in p.t_note and "sex unknown" in p.t_note) == (sex == "")
    assert not sex or f"({sex} level pattern)" in p.t_note
    page = report_html.write_index(tmp_path / "index.html", [report], "s", "model").read_text()
    assert escape(SCREENING_ESTIMATE) in page and escape(p.t_note) in page and "non-contrast CT" in page


def test_report_names_the_levels_used_and_pickhardts_bands_as_osteoporosis_thresholds():
    from osteo_model.baselines import hu_category
    from osteo_model.screening import HU_RULE_NAMES, region_name

    assert region_name(list(LEVELS)) == "L1-L4" and region_name(["L2", "L3", "L4"]) == "L2-L4"
    assert region_name(["L1", "L3", "L4"]) == "L1, L3, L4" and region_name(["L3"]) == "L3"
    # Pickhardt 2013: <= 160 HU is 90 % sensitive, <= 110 HU > 90 % specific, both for OSTEOPOROSIS
    names = [HU_RULE_NAMES[int(c)] for c in hu_category(np.array([200.0, 150.0, 100.0]))]
    assert names[0].startswith("osteoporosis unlikely") and names[1].startswith("osteoporosis not excluded")
    assert names[2].startswith("osteoporosis likely") and not any("osteopenia" in n for n in names)


def test_the_report_categorises_the_t_score_it_prints():
    """A headline that prints "T -2.5" says osteoporosis, although the unrounded T is -2.46 (ISCD: one decimal)."""
    from osteo_model import bmd as bmdlib
    from osteo_model.screening import LevelResult, _patient

    mean, sd = YOUNG_ADULT_REFERENCE["hologic"]
    value = mean - 2.46 * sd
    levels = [LevelResult(lv, True, bmd=value, t_score=bmdlib.region_t_score(value, [lv], "hologic", "female"))
              for lv in LEVELS]
    ref = Reference(np.zeros(0), np.zeros(0), 0, frozenset(), None, None, 0.9, 5)
    p = _patient(levels, "hologic", "female", 65.0, ref, "")
    assert p.t_score == pytest.approx(-2.46) and f"{p.t_score:+.1f}" == "-2.5"
    assert p.category == "osteoporosis" and bmdlib.category_from_t(p.t_score) == 1


def test_the_patient_value_without_an_iscd_flagged_level_is_given_beside_it():
    """ISCD lets the reader exclude a level whose T-score stands apart (degenerative L4): the report gives the
    patient value without it, on the remaining levels' reference, instead of leaving the sum to the reader."""
    from osteo_model import bmd as bmdlib
    from osteo_model.screening import LevelResult, _patient, flag_outlier_levels

    bmd = {"L1": 0.78, "L2": 0.80, "L3": 0.79, "L4": 1.05}
    levels = [LevelResult(lv, True, bmd=v, t_score=bmdlib.region_t_score(v, [lv], "hologic", "female"))
              for lv, v in bmd.items()]
    flag_outlier_levels(levels)
    assert [lv.iscd_outlier for lv in levels] == [False, False, False, True]
    ref = Reference(np.zeros(0), np.zeros(0), 0, frozenset(), None, None, 0.9, 5)
    p = _patient(levels, "hologic", "female", 65.0, ref, "")
    assert p.levels_used == list(LEVELS)  # flagged, not excluded
    rest = bmdlib.region_t_score(np.mean([0.78, 0.80, 0.79]), ["L1", "L2", "L3"], "hologic", "female")
    assert p.without_flagged == (f"without L4 (flagged): L1-L3 BMD {np.mean([0.78, 0.80, 0.79]):.3f} g/cm², "
                                 f"T {rest:+.1f}, {category_name(int(reported_category(rest)))}")
    assert rest < p.t_score - 0.3
    unflagged = [LevelResult(lv, True, bmd=0.8, t_score=-2.0) for lv in LEVELS]
    flag_outlier_levels(unflagged)
    assert _patient(unflagged, "hologic", "female", 65.0, ref, "").without_flagged == ""
