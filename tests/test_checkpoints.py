"""One reader of every model file (osteo_model.checkpoints): central checkpoints, federated round-NNNN.npz and
site models load to one format, damaged or foreign files are refused naming the file, models trained on other
crop settings or features are refused, and osteo-eval names a site whose split is empty."""
from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_factory import FEATURE_NAMES, make_site_cache
from federation_helpers import SITES, make_caches as fed_caches, small_overrides
from model_helpers import make_caches, tiny_cfg
from test_federation_rounds import _federation
from osteo_model import model as osteo
from osteo_model.central import checkpoint_payload, load_sites, models_from_checkpoint
from osteo_model.evaluate import evaluate_checkpoint
from osteo_model.checkpoints import (
    MODEL_CARD_FILE, SITE_MODEL_FILE, STATE_KEYS, check_compatible, features_sha256, load_model_state, model_meta,
    kept_card, save_model_state, save_site_model, site_card, write_npz,
)
from osteo_model.cli import evaluate as eval_cli
from osteo_model.config import compose
from osteo_model.dataset import load_site_data
from osteo_model.errors import ConfigError, StateError
from osteo_model.training import predict
from osteofl.client.policy import COUNT_METRICS

CROP = {"size": 16, "fov_mm": 16.0}  # what make_site_cache records


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    make_caches(root)
    make_site_cache(root / "data" / "cache" / "site_one", site="site_one", n_patients=1, labeled_frac=1.0, seed=7)
    return root


@pytest.fixture(scope="module")
def trained(root):
    """Per-site models (untrained but distinct local parts) and their data."""
    cfg = tiny_cfg(root)
    datas = load_sites(cfg, ["site_a", "site_b"])
    torch.manual_seed(0)
    models = osteo.build_site_models(cfg, len(FEATURE_NAMES), {s: d.manufacturer for s, d in datas.items()})
    for m in models.values():
        for p in osteo.local_parameters(m):
            torch.nn.init.normal_(p, std=0.3)
        osteo.set_feature_stats(m, *osteo.feature_stats(np.asarray(datas["site_a"].cache.features)))
    return cfg, datas, models

pytestmark = pytest.mark.usefixtures("task_identity")


def _write_all(folder: Path, cfg, models) -> dict[str, Path]:
    central = save_model_state(folder / "checkpoint.pt", checkpoint_payload(models, cfg, FEATURE_NAMES, CROP, done=1))
    shared = {k: v.numpy() for k, v in osteo.shared_state(models["site_a"]).items()}
    meta = {**model_meta(tiny_cfg(folder, "crop.size=16", "crop.fov_mm=16"), len(FEATURE_NAMES),
                         features_sha256(FEATURE_NAMES)), "round": 3, "phase": "task", "strategy": "fedavg"}
    federated = write_npz(folder / "round-0003.npz", shared, {}, meta)
    card = site_card(None, run_id="7", rnd=3, n_sites=2, phases={"ssl": 1, "task": 2}, epsilon=0.5,
                     metrics={"auc": 0.8, "mae_bmd": float("nan")}, split="val")
    site = save_site_model(folder / "state", models["site_b"], site="site_b", feature_names=FEATURE_NAMES,
                           model_cfg=cfg.model, crop=CROP, card=card)
    return {"central": central, "federated": federated, "site": site}


def test_every_format_loads_to_one_state(trained, tmp_path: Path) -> None:
    cfg, datas, models = trained
    paths = _write_all(tmp_path, cfg, models)
    shared_keys = set(osteo.shared_keys(models["site_a"]))
    for kind, path in paths.items():
        state = load_model_state(path)
        assert set(STATE_KEYS) <= set(state) and state["kind"] == kind and set(state["shared"]) == shared_keys
        assert state["n_features"] == len(FEATURE_NAMES) and state["features_sha256"] == features_sha256(FEATURE_NAMES)
        assert state["crop"]["size"] == 16 and float(state["crop"]["fov_mm"]) == 16.0
    assert set(load_model_state(paths["central"])["local"]) == {"site_a", "site_b"}
    assert load_model_state(paths["central"])["done"] == 1  # training extras kept for resuming
    fed = load_model_state(paths["federated"])
    assert fed["local"] == {} and fed["feature_names"] is None and fed["card"]["round"] == 3
    # the state folder is enough; the model card is the file beside it
    site = load_model_state(tmp_path / "state")
    assert set(site["local"]) == {"site_b"} and site["manufacturers"] == {"site_b": "ge_lunar"}
    card = json.loads((tmp_path / "state" / MODEL_CARD_FILE).read_text())
    assert card == site["card"] and card["validation_metrics"] == {"auc": 0.8, "mae_bmd": None}
    assert card["run_id"] == "7" and card["round"] == 3 and card["n_sites"] == 2 and card["epsilon_spent"] == 0.5
    assert card["phases"] == {"ssl": 1, "task": 2} and card["crop"] == CROP and "research use only" in card["use"]


def test_central_checkpoint_of_the_earlier_format_still_loads_and_evaluates(trained, tmp_path: Path) -> None:
    cfg, datas, models = trained
    old = {k: v for k, v in checkpoint_payload(models, cfg, FEATURE_NAMES, CROP).items()
           if k not in ("kind", "crop", "features_sha256")}
    state = load_model_state(save_model_state(tmp_path / "checkpoint.pt", old))
    assert state["kind"] == "central" and state["crop"] is None
    assert state["features_sha256"] == features_sha256(FEATURE_NAMES)
    report = evaluate_checkpoint(state, cfg, datas, "test")
    assert set(report) == {"site_a", "site_b", "overall"} and report["overall"]["num_examples"] > 0


def test_site_model_predicts_exactly_as_the_model_it_was_saved_from(trained, tmp_path: Path) -> None:
    cfg, datas, models = trained
    _write_all(tmp_path, cfg, models)
    rebuilt = models_from_checkpoint(load_model_state(tmp_path / "state" / SITE_MODEL_FILE), cfg)
    rows = datas["site_b"].splits["test"]
    want, got = (predict(m["site_b"], datas["site_b"], rows, "cpu", 64) for m in (models, rebuilt))
    np.testing.assert_array_equal(got["bmd"], want["bmd"])
    np.testing.assert_array_equal(got["p"], want["p"])
    # and the local parts matter: without them (a new site) the prediction differs
    bare = models_from_checkpoint({**load_model_state(tmp_path / "state"), "local": {}}, cfg)
    assert not np.allclose(predict(bare["site_b"], datas["site_b"], rows, "cpu", 64)["bmd"], want["bmd"])


def _save_site(folder: Path, cfg, model, card: dict) -> Path:
    return save_site_model(folder, model, site="site_b", feature_names=FEATURE_NAMES, model_cfg=cfg.model, crop=CROP,
                           card=card)


def test_final_test_evaluation_does_not_overwrite_validation_metrics(trained, tmp_path: Path) -> None:
    cfg, _, models = trained
    common = dict(rnd=2, n_sites=2, phases={"ssl": 1, "task": 1}, epsilon=0.0)
    _save_site(tmp_path, cfg, models["site_b"], site_card(None, run_id="1", metrics={"auc": 0.7}, split="val", **common))
    kept = kept_card(tmp_path, "1")
    assert site_card(kept, run_id="1", metrics={"auc": 0.9}, split="test", **common)["validation_metrics"] == {"auc": 0.7}
    # another run's validation is not this run's: it keeps no model yet
    assert kept_card(tmp_path, "2") is None
    assert site_card(kept_card(tmp_path, "2"), run_id="2", metrics={"auc": 0.9}, split="test",
                     **common)["validation_metrics"] is None


def test_a_save_killed_between_model_and_card_keeps_selecting_against_the_saved_model(trained, tmp_path: Path,
                                                                                     monkeypatch) -> None:
    """The site model and its readable card are two files: a process killed after the model's write leaves
    the card of the model before. Selection reads the card written inside the model file, so a candidate
    worse than the saved model cannot replace it, and the readable copy is put right."""
    from osteo_model import checkpoints

    cfg, _, models = trained
    common = dict(n_sites=2, phases={"ssl": 1, "task": 3}, epsilon=0.0, metrics={}, split="val")
    _save_site(tmp_path, cfg, models["site_b"], site_card(None, run_id="1", rnd=2, selection={"score": 0.5}, **common))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoints, "_write_card", killed)
    with pytest.raises(KeyboardInterrupt):
        _save_site(tmp_path, cfg, models["site_b"], site_card(None, run_id="1", rnd=3, selection={"score": 0.3}, **common))
    monkeypatch.undo()
    assert json.loads((tmp_path / MODEL_CARD_FILE).read_text())["round"] == 2  # the copy the kill left behind
    kept = kept_card(tmp_path, "1")
    assert kept["round"] == 3 and not checkpoints.replaces_kept(kept, 0.4)  # 0.4 beat the stale 0.5, not 0.3
    assert json.loads((tmp_path / MODEL_CARD_FILE).read_text()) == kept


def _torch_zip_with(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


class _Payload:  # any pickled object: a model file must not run code when loaded
    def __reduce__(self):
        return (print, ("pwned",))


def test_damaged_and_foreign_files_are_state_errors_naming_the_file(trained, tmp_path: Path, capsys) -> None:
    cfg, _, models = trained
    paths = _write_all(tmp_path, cfg, models)
    bad: dict[str, Path] = {}
    bad["garbage"] = tmp_path / "garbage.pt"
    bad["garbage"].write_bytes(b"not a checkpoint at all")
    for kind in ("site", "federated", "central"):
        data = paths[kind].read_bytes()
        bad[f"truncated {kind}"] = tmp_path / f"trunc-{paths[kind].name}"
        bad[f"truncated {kind}"].write_bytes(data[: len(data) // 2])
    bad["npz without meta"] = tmp_path / "round-0009.npz"
    np.savez(bad["npz without meta"], **{"arrays/encoder.w": np.zeros(3)})
    old_meta = tmp_path / "round-0010.npz"  # a server checkpoint from before model_cfg was recorded
    write_npz(old_meta, {"encoder.w": np.zeros(3)}, {}, {"round": 10, "phase": "task"})
    bad["npz without model config"] = old_meta
    bad["pickled code"] = _torch_zip_with({"shared": {}, "local": {}, "manufacturers": {}, "feature_names": [],
                                           "model_cfg": {}, "x": _Payload()}, tmp_path / "evil.pt")
    bad["torch file, not a model"] = _torch_zip_with({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    bad["other zip"] = tmp_path / "other.zip"
    with zipfile.ZipFile(bad["other zip"], "w") as zf:
        zf.writestr("readme.txt", "hello")
    bad["missing"] = tmp_path / "nope.pt"
    bad["folder without site model"] = tmp_path / "empty-state"
    bad["folder without site model"].mkdir()
    for what, path in bad.items():
        with pytest.raises(StateError) as err:
            load_model_state(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value), what
    assert "pwned" not in capsys.readouterr().out
    assert "lacks ['model_cfg', 'n_features']" in str(pytest.raises(StateError, load_model_state, old_meta).value)


def test_non_finite_weights_are_refused_in_every_format_naming_the_file(trained, tmp_path: Path) -> None:
    """A damaged or diverged model would predict NaN for every study: refused when loaded, not reported."""
    cfg, _, models = trained
    payload = checkpoint_payload(models, cfg, FEATURE_NAMES, CROP)
    local = {**payload["local"]["site_b"]}
    first = next(iter(local))
    local[first] = torch.full_like(local[first], float("nan"))
    central = save_model_state(tmp_path / "checkpoint.pt", {**payload, "local": {**payload["local"], "site_b": local}})
    shared = {k: v.numpy() for k, v in payload["shared"].items()}
    shared[next(iter(shared))] = np.full_like(shared[next(iter(shared))], np.inf)
    federated = write_npz(tmp_path / "round-0001.npz", shared, {}, model_meta(cfg, len(FEATURE_NAMES),
                                                                              features_sha256(FEATURE_NAMES)))
    for path, n in ((central, local[first].numel()), (federated, next(iter(shared.values())).size)):
        with pytest.raises(StateError) as err:
            load_model_state(path)
        assert str(err.value) == f"{path}: model holds {n} non-finite weights (damaged or diverged)"


def test_tampered_fields_are_state_errors_naming_the_file_and_field(trained, tmp_path: Path) -> None:
    cfg, _, models = trained
    payload = checkpoint_payload(models, cfg, FEATURE_NAMES, CROP)
    tampered = {"feature_names": 5, "shared": [1, 2], "manufacturers": {"site_a": 3}, "model_cfg": "small",
                "local": {"site_a": {"w": [0.0]}}, "card": ["x"]}
    for field, value in tampered.items():
        path = save_model_state(tmp_path / f"{field}.pt", {**payload, field: value})
        with pytest.raises(StateError) as err:
            load_model_state(path)
        assert str(err.value).startswith(f"{path}: field {field!r} is {type(value).__name__}, not ")
    # Types right, content this version cannot build a model from (or weights that do not fit it): the
    # rebuild names the file too.
    extra_key = save_model_state(tmp_path / "extra.pt", {**payload, "model_cfg": {**payload["model_cfg"], "bogus": 1}})
    with pytest.raises(StateError, match=f"^{extra_key}: model_cfg has settings .*'bogus'"):
        models_from_checkpoint(load_model_state(extra_key), cfg)
    wider = {**payload["model_cfg"], "embed_dim": 2 * payload["model_cfg"]["embed_dim"]}
    other_width = save_model_state(tmp_path / "wider.pt", {**payload, "model_cfg": wider})
    with pytest.raises(StateError, match=f"^{other_width}: shared state .*shape"):
        models_from_checkpoint(load_model_state(other_width), cfg)


def test_other_crop_settings_or_features_are_refused_with_the_fix(trained, tmp_path: Path) -> None:
    cfg, _, models = trained
    paths = _write_all(tmp_path, cfg, models)
    for path in paths.values():
        state = load_model_state(path)
        check_compatible(state, CROP, FEATURE_NAMES)  # matching: no error
        check_compatible(state, None, FEATURE_NAMES)  # a cache that records no crop settings: not compared
        with pytest.raises(ConfigError) as err:
            check_compatible(state, {"size": 64, "fov_mm": 64.0}, FEATURE_NAMES)
        assert str(err.value).startswith("model was trained on 16^3 crops over 16 mm; this cache has 64^3 crops "
                                         "over 64 mm (differ: size, fov_mm): re-run osteo-prepare with crop.size=16")
        with pytest.raises(ConfigError, match="another radiomic feature set"):
            check_compatible(state, CROP, [*FEATURE_NAMES[:-1], "other"])


def test_eval_of_a_site_with_an_empty_split_warns_instead_of_nan_rows(root: Path, trained, tmp_path: Path, capsys) -> None:
    cfg, _, models = trained
    ckpt = save_model_state(tmp_path / "checkpoint.pt", checkpoint_payload(models, cfg, FEATURE_NAMES, CROP))
    out = tmp_path / "eval"
    args = [f"paths.root={root}", "train.sites=[site_a,site_b]", "model.channels=[4,8,8,8]", "model.embed_dim=16",
            "model.expert_hidden=8", "train.batch_size=8", "eval.sites=[site_a,site_one]", "eval.plots=false",
            f"eval.out_dir={out}", f"eval.checkpoints.full={ckpt}"]
    assert eval_cli.main(args) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: site_one: no labeled patient in the test split (patients: train 1, val 0, test 0); "
                        "left out of the tables"]
    report = json.loads((out / "metrics.json").read_text())
    for method in ("full", "hu_threshold", "radiomics_linear"):
        assert "site_a" in report[method] and not any(k.startswith("site_one") for k in report[method]), method
    assert report["full"]["site_a"]["num_examples"] > 0
    assert "site_one" not in (out / "results.md").read_text()


@pytest.mark.slow
def test_site_model_of_a_federated_run_reproduces_its_final_evaluation(tmp_path: Path) -> None:
    """After a real ServerApp/ClientApp run, each site's state folder holds a model that osteo-eval's
    evaluation turns into exactly the numbers of the run's final evaluation of that site."""
    two = {s: SITES[s] for s in ("site_a", "site_b")}
    root = fed_caches(tmp_path, two)
    crop = {"crop.size": 12, "crop.fov_mm": 12.0}  # what the fake caches record
    fed, _ = _federation(root, sites=two, **crop)
    fed.run()
    run = root / "outputs" / "federated"
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["split"] == "test"
    last_round = json.loads((run / "history.json").read_text())[-1]
    cfg = compose(small_overrides(root))
    datas = {site: load_site_data(root / "data" / "cache" / site, cfg) for site in two}

    def same(got: dict, want: dict, at_least: int) -> None:  # counts leave a site rounded (client/policy.py)
        keys = [k for k in want if isinstance(want[k], (int, float)) and k.replace("-", "_") in got
                and k not in COUNT_METRICS]
        assert len(keys) >= at_least, keys
        for k in keys:
            a, b = float(got[k.replace("-", "_")]), float(want[k])
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (k, a, b)

    for site in two:
        state = load_model_state(root / "data" / "state" / site)
        assert state["kind"] == "site" and set(state["local"]) == {site}
        card = json.loads((root / "data" / "state" / site / MODEL_CARD_FILE).read_text())
        assert card["round"] == 2 and card["phases"] == {"ssl": 1, "task": 1} and card["n_sites"] == 2
        assert card["crop"] == {"size": 12, "fov_mm": 12.0} and card["epsilon_spent"] == 0.0
        # the card's validation metrics are the last round's val evaluation, not the final test one
        same({k: (float("nan") if v is None else v) for k, v in card["validation_metrics"].items()},
             last_round["site_eval"][site], at_least=8)
        got = evaluate_checkpoint(state, cfg, {site: datas[site]}, "test")
        assert set(got) == {site, "overall"}  # its own site: evaluated with its local parts, no onboarding
        same(got[site], final["sites"][site], at_least=8)

    # the server's checkpoint: shared weights only, every site evaluated as a new site (and onboarded)
    fed_state = load_model_state(sorted((run / "checkpoints").glob("round-*.npz"))[-1])
    assert fed_state["kind"] == "federated" and fed_state["crop"]["size"] == 12
    assert set(evaluate_checkpoint(fed_state, cfg, {"site_a": datas["site_a"]}, "test")) == {"site_a", "site_a+onboarded"}
    # and its recorded crop settings are checked against the cache's
    with pytest.raises(ConfigError, match="model was trained on 12\\^3 crops over 12 mm"):
        check_compatible(fed_state, {"size": 32, "fov_mm": 48.0}, datas["site_a"].cache.feature_names)
