import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from osteo_model import model as osteo
from osteo_model.central import load_sites, train_central
from osteo_model.cli import evaluate as eval_cli, train as train_cli
from osteo_model.dataset import CropDataset, load_site_data
from osteo_model.errors import StateError
from osteo_model.checkpoints import load_model_state
from osteo_model.training import evaluate, fit_local, make_loader, make_optimizer, train_steps

from model_helpers import make_caches, tiny_cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    make_caches(root)
    return root


def _site(root, *extra, site="site_a"):
    cfg = tiny_cfg(root, *extra)
    return cfg, load_site_data(root / "data" / "cache" / site, cfg)


def test_splits_are_by_patient_and_deterministic(root):
    cfg, data = _site(root)
    pid = data.cache.table["patient_id"].to_numpy()
    sets = {k: set(pid[v]) for k, v in data.splits.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert all(data.cache.table["labeled"].to_numpy()[data.splits["train"]])
    assert not sets["unlabeled"] & (sets["val"] | sets["test"])  # held-out crops never used, even for SSL
    assert len(data.splits["unlabeled"]) > len(data.splits["train"])  # unlabeled studies are in the SSL pool
    _, again = _site(root)
    assert all(np.array_equal(data.splits[k], again.splits[k]) for k in data.splits)
    _, other = _site(root, "seed=1")
    assert not np.array_equal(data.splits["test"], other.splits["test"])
    _, few = _site(root, "data.label_fraction=0.25")
    assert set(pid[few.splits["train"]]) < sets["train"] and len(set(pid[few.splits["train"]])) == 2
    assert np.array_equal(few.splits["test"], data.splits["test"])
    assert data.manufacturer == "hologic"


def _patients(data) -> dict[str, set[str]]:
    pid = data.cache.table["patient_id"].astype(str).to_numpy()
    return {k: set(pid[v]) for k, v in data.splits.items() if k != "unlabeled"}


def test_a_pinned_split_keeps_every_patient_where_it_was_when_new_patients_arrive(tmp_path):
    """A deployed site re-prepares its cache with new patients. Unpinned, the split reshuffles: patients a
    model trained on become validation and test patients. Pinned, each keeps its split, only the new ones
    are split afresh, and a pin made with other split settings is refused by its file name."""
    from cache_factory import copy_cache, make_site_cache
    from osteo_model.cache import SiteCache
    from osteo_model.dataset import SPLIT_FILE
    from osteo_model.errors import ConfigError

    grown, first = tmp_path / "grown", tmp_path / "cache"
    make_site_cache(grown, site="site_a", n_patients=40, size=8, labeled_frac=1.0)
    table = SiteCache.open(grown).table
    copy_cache(grown, first, table["patient_id"].isin([f"site_a-p{i:03d}" for i in range(30)]).to_numpy())  # before 10 new
    cfg, pin = tiny_cfg(tmp_path), tmp_path / "state" / SPLIT_FILE
    assert load_site_data(first, cfg, pin=pin).split_id is None and not pin.exists()  # reading never pins
    before = load_site_data(first, cfg, pin=pin, write_pin=True)
    assert before.split_id and pin.is_file() and _patients(before) == _patients(load_site_data(first, cfg))
    old = set().union(*_patients(before).values())
    moved = {k: v & old for k, v in _patients(load_site_data(grown, cfg)).items()}
    assert moved != _patients(before)  # the problem: unpinned, old patients change split
    after = load_site_data(grown, cfg, pin=pin, write_pin=True)
    assert {k: v & old for k, v in _patients(after).items()} == _patients(before)
    assert set().union(*_patients(after).values()) > old and after.split_id == before.split_id
    assert _patients(load_site_data(grown, cfg, pin=pin)) == _patients(after)  # as osteo-predict reads it
    with pytest.raises(ConfigError, match=SPLIT_FILE):
        load_site_data(grown, tiny_cfg(tmp_path, "data.split_seed=9"), pin=pin)
    good = json.loads(pin.read_text())
    for bad, match in (("{not json", "unreadable pinned patient split"),
                       (json.dumps({**good, "patients": {**good["patients"], "site_a-p000": "holdout"}}), "holdout"),
                       (json.dumps({k: v for k, v in good.items() if k != "id"}), "without an id")):
        pin.write_text(bad)  # looks like a pin; a patient must not silently drop out of every split
        with pytest.raises(StateError, match=match):
            load_site_data(grown, cfg, pin=pin)


def test_a_row_on_another_dxa_device_teaches_sbmd_and_category_not_calibration(root):
    """The calibration head predicts the site's device; a GE Lunar row at a Hologic site is on another scale."""
    from osteo_model.losses import task_losses

    cfg, data = _site(root)
    rows = data.splits["train"][:3]
    data.cache.table.loc[data.cache.table.index[rows[2]], "dxa_manufacturer"] = "ge_lunar"
    items = [CropDataset(data.cache, rows, device=data.manufacturer)[i] for i in range(3)]
    assert np.isnan(float(items[2]["bmd"])) and np.isfinite(float(items[2]["sbmd"])) and int(items[2]["category"]) >= 0
    assert all(np.isfinite(float(it["bmd"])) for it in items[:2])
    batch = {k: torch.stack([it[k] for it in items]) for k in ("sbmd", "bmd", "category", "level")}
    out = {"sbmd": batch["sbmd"] + torch.tensor([0.15, 0.15, 0.3]), "bmd": batch["bmd"].nan_to_num(0.0) + 0.15,
           "diagnosis": torch.zeros(3, 3), "level": torch.zeros(3, 4)}
    losses = task_losses(out, batch)
    assert float(losses["sbmd"]) == pytest.approx((1 + 1 + 4) / 3)  # all three rows, in units of SBMD_SCALE
    assert float(losses["calib"]) == pytest.approx(1.0)              # the two Hologic rows only


def test_augmentation_only_permutes_axial_plane(root):
    cfg, data = _site(root)
    plain = CropDataset(data.cache, data.splits["train"][:1])[0]["x"]
    aug = CropDataset(data.cache, data.splits["train"][:1], augment=True, seed=3)[0]["x"]
    assert aug.shape == plain.shape
    assert torch.equal(torch.sort(aug[1].flatten()).values, torch.sort(plain[1].flatten()).values)  # mask permuted
    # intensities keep their distribution up to a small jitter (no blur: SD of the HU channel is kept)
    assert abs(float(aug[0].std() / plain[0].std()) - 1) < 0.05
    # z (axis 0 of the crop) is never flipped: per-slice mask sums are unchanged
    assert torch.equal(aug[1].sum((1, 2)), plain[1].sum((1, 2)))


def test_each_pass_draws_its_own_order_keyed_with_a_sites_salt(root):
    """Each round or epoch (pass) draws its own batch order, reproducible from the run's seed and the pass:
    with one order for every pass, rounds of fewer local steps than a pass trained on the same first
    batches every round. A deployed site keys the order with a secret salt (the coordinator sets the seed)
    and with the batch size, and every salted batch is full: batches of B and B+1 rows from one order, or a
    pass's partial last batch, would let two replies differ by a single row."""
    cfg, data = _site(root)

    def loader(salt=None, batch=8, pass_index=0):
        return make_loader(data, tiny_cfg(root, f"train.batch_size={batch}"), "ssl", salt=salt, pass_index=pass_index)

    def order(salt=None, batch=8, pass_index=0):
        return list(loader(salt, batch, pass_index).sampler)

    plain = order()
    assert order() == plain and order(batch=9) == plain and sorted(plain) == list(range(len(plain)))
    assert len(list(loader(batch=9))[-1]["x"]) == len(plain) % 9  # unsalted: the partial batch is kept
    passes = [order(pass_index=i) for i in range(1, 6)]
    assert len({tuple(p) for p in [plain, *passes]}) == 6
    # five rounds of two batches each: the old single order trained on the same 16 rows every round
    assert len({r for p in passes for r in p[:16]}) > 16 and len(plain) > 16
    salt = "a" * 32
    assert order(salt) == order(salt) != order("b" * 32) and order(salt) != plain
    assert order(salt, pass_index=1) != order(salt) and order(salt, pass_index=1) != order(pass_index=1)
    assert order(salt, batch=9)[:8] != order(salt)[:8]
    assert len(plain) % 9 and {len(b["x"]) for b in loader(salt, batch=9)} == {9}


def test_train_steps_and_evaluate_report_aggregates(root):
    cfg, data = _site(root)
    model = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer)
    osteo.set_feature_stats(model, *osteo.feature_stats(data.cache.features))
    opt = make_optimizer(model.parameters(), cfg)
    ssl = train_steps(model, data, cfg, "ssl", opt, "cpu")
    assert ssl["num_examples"] == len(data.splits["unlabeled"]) and np.isfinite(ssl["ssl"])
    task = train_steps(model, data, cfg, "task", opt, "cpu", max_steps=3)
    assert task["num_examples"] == 3 * 8 and {"sbmd", "calib", "diag", "level", "balance"} <= set(task)
    res = evaluate(model, data, cfg, "test", "cpu")
    assert res["num_examples"] == len(data.splits["test"])
    assert {"auc", "acc3", "f1_macro", "mae_sbmd", "mae_bmd", "r_sbmd", "bias_bmd"} <= set(res)
    assert all(isinstance(v, float) for v in res.values())


@pytest.mark.slow
def test_ssl_learns_texture_features(root):
    """The fake crops' texture statistics are predictable from the crop: SSL loss must fall well below
    the loss of a constant prediction."""
    cfg, data = _site(root)
    model = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer)
    osteo.set_feature_stats(model, *osteo.feature_stats(data.cache.features))
    opt = make_optimizer(model.parameters(), cfg)
    # ten rounds of 20 steps, each its own order (a loss read on one fixed order measured those batches
    # alone: between orders it ended anywhere from 0.34 to 0.87 of the first round's after 120 steps)
    losses = [train_steps(model, data, cfg, "ssl", opt, "cpu", max_steps=20, pass_index=p)["ssl"] for p in range(1, 11)]
    assert losses[-1] < 0.5 * losses[0]


def test_fit_local_changes_only_local_parameters(root):
    cfg, data = _site(root)
    model = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer)
    shared0, local0 = osteo.shared_state(model), osteo.local_state(model)
    res = fit_local(model, data, cfg, "cpu", epochs=2)
    assert res["num_examples"] == len(data.splits["train"])
    assert all(torch.equal(v, osteo.shared_state(model)[k]) for k, v in shared0.items())
    assert any(not torch.equal(v, osteo.local_state(model)[k]) for k, v in local0.items())
    assert all(p.requires_grad for p in model.parameters())


def test_central_training_checkpoints_and_resumes(root, tmp_path):
    cfg = tiny_cfg(root, "train.ssl_epochs=1", "train.task_epochs=1")
    datas = load_sites(cfg, ["site_a", "site_b"])
    logs = []
    models, history = train_central(cfg, datas, tmp_path, log=logs.append)
    state = load_model_state(tmp_path / "checkpoint.pt")
    assert state["done"] == 2 and [h["phase"] for h in history] == ["ssl", "task"]
    assert set(state["local"]) == {"site_a", "site_b"} and state["manufacturers"]["site_b"] == "ge_lunar"
    assert "val_site_a_auc" in history[-1]
    # a longer plan cannot silently resume a checkpoint of another plan
    with pytest.raises(StateError, match="other ssl_epochs"):
        train_central(tiny_cfg(root, "train.ssl_epochs=1", "train.task_epochs=2", "train.resume=true"), datas, tmp_path)
    # resuming a finished run trains nothing more and keeps the weights
    logs.clear()
    again, _ = train_central(tiny_cfg(root, "train.ssl_epochs=1", "train.task_epochs=1", "train.resume=true"), datas, tmp_path, log=logs.append)
    assert logs == [f"resumed from {tmp_path / 'checkpoint.pt'} after 2/2 epochs"]
    assert all(torch.equal(v, osteo.shared_state(models["site_a"])[k]) for k, v in osteo.shared_state(again["site_a"]).items())


def test_train_and_eval_cli_end_to_end(root, tmp_path, capsys):
    from model_helpers import TINY
    common = [f"paths.root={root}", "train.sites=[site_a,site_b]", "synth.external_site=site_ext", *TINY,
              f"paths.outputs={tmp_path}", "train.fit_local_epochs=1"]
    assert train_cli.main([*common, "train.ssl_epochs=1", "train.task_epochs=1"]) == 0
    assert eval_cli.main(common) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(report) == {"full", "hu_threshold", "radiomics_linear"}
    assert {"site_a", "site_b", "site_ext", "site_ext+onboarded", "overall"} <= set(report["full"])
    assert "overall" in report["hu_threshold"] and "bias_bmd_ge_lunar" in report["full"]["overall"]
    for kind in ("roc", "scatter", "bland_altman"):
        assert (tmp_path / "eval" / f"{kind}_full_overall.png").stat().st_size > 1000
    assert "| full | overall |" in (tmp_path / "eval" / "results.md").read_text()


def test_cli_reports_missing_cache_in_one_line(tmp_path, capsys):
    assert train_cli.main([f"paths.root={tmp_path}", "train.sites=[nowhere]"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nowhere" in err[0] and "osteo-prepare" in err[0]


REAL_EXAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real" / "totalseg_example"


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_EXAMPLE / "ct.nii.gz").is_file(), reason="../shared/data/real not present")
def test_real_case_runs_through_model_and_eval(root, tmp_path, capsys):
    """The real TotalSegmentator example (no DXA): prepared, then predicted by a trained checkpoint;
    osteo-eval writes its per-vertebra predictions (no accuracy claim: there is no DXA). A model trained on
    crops of other settings is refused first."""
    import pandas as pd

    from cache_factory import make_site_cache
    from model_helpers import TINY
    from osteo_model.cli import prepare as prepare_cli

    site = root / "data" / "sites" / "real"
    site.mkdir(parents=True)
    pd.DataFrame([{"study_id": "example", "patient_id": "x", "ct_date": "2020-01-01",
                   "ct": str(REAL_EXAMPLE / "ct.nii.gz"), "labels": str(REAL_EXAMPLE / "seg_total.nii.gz")}]
                 ).to_csv(site / "studies.csv", index=False)
    common = [f"paths.root={root}", "train.sites=[site_a,site_b]", *TINY, f"paths.outputs={tmp_path}"]
    assert prepare_cli.main(["--site", "real", "--no-progress", f"paths.root={root}"]) == 0  # 32^3 over 48 mm
    assert train_cli.main([*common, "train.ssl_epochs=0", "train.task_epochs=1"]) == 0  # fake caches: 16^3, 16 mm
    capsys.readouterr()
    assert eval_cli.main([*common, "eval.sites=[real]", "eval.baselines=false"]) == 1
    assert "model was trained on 16^3 crops over 16 mm; this cache has 32^3 crops over 48 mm" in capsys.readouterr().err
    # trained on caches of the real one's crop settings and radiomic features, it predicts
    real = root / "data" / "cache" / "real"
    names = json.loads((real / "features.json").read_text())["names"]
    for i, (name, manufacturer) in enumerate((("site_a", "hologic"), ("site_b", "ge_lunar"))):
        make_site_cache(tmp_path / "cache" / name, site=name, n_patients=6, size=32, fov_mm=48.0,
                        manufacturer=manufacturer, seed=i, feature_names=names)
    shutil.copytree(real, tmp_path / "cache" / "real")
    common += [f"paths.cache_root={tmp_path / 'cache'}"]
    assert train_cli.main([*common, "train.ssl_epochs=0", "train.task_epochs=1"]) == 0
    assert eval_cli.main([*common, "eval.sites=[real]", "eval.baselines=false"]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["full"]["real"] == {"num_examples": 0.0, "num_vertebrae_predicted": 4.0}
    pred = pd.read_csv(tmp_path / "eval" / "predictions_full_real.csv")
    assert list(pred["level"]) == ["L1", "L2", "L3", "L4"]
    assert pred["bmd_pred"].between(0.2, 2.5).all()
    assert set(pred["category_pred"]) <= {"normal", "osteopenia", "osteoporosis"}
