"""osteo-evidence's run cache: what its key covers (what changes training and evaluation, the data by
content) and what it leaves out (deployment-only settings)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cache_factory import make_site_cache
from federation_helpers import small_overrides
from osteo_model.config import compose
from osteo_model.dataset import load_site_data
from osteofl.simulation import evidence

NO_DATA = "data"


def _key(tmp_path, *overrides: str) -> str:
    return evidence._config_key(compose([*small_overrides(tmp_path), *overrides]), NO_DATA)


@pytest.mark.parametrize("override", [
    "federation.reply_poll_s=1.5", "federation.superlink.port=1234", "federation.round_timeout=5",
    "federation.robust.max_update_norm=null", "federation.simulation.client_cpus=2", "federation.run_name=other",
    "paths.root=/elsewhere", "paths.outputs=/elsewhere/out", "synth.n_jobs=3", "radiomics.n_jobs=3",
    "site.policy.min_cohort=20", "predict.png_dpi=200", "federation.min_train_replies=3"])
def test_deployment_only_settings_keep_the_key(tmp_path, override):
    assert _key(tmp_path, override) == _key(tmp_path)


@pytest.mark.parametrize("override", [
    "federation.task_rounds=9", "federation.ssl_rounds=3", "federation.local_steps=7", "train.lr=0.5", "seed=3",
    "federation.strategy=fedprox", "federation.strategy_args.fedprox.proximal_mu=0.5", "federation.share_all=true",
    "federation.personal_prefixes=[heads.]", "model.embed_dim=8", "train.fit_local_epochs=2",
    "data.label_fraction=0.5", "synth.labeled_per_site=7", "crop.size=8", "device=cpu"])
def test_what_changes_training_changes_the_key(tmp_path, override):
    assert _key(tmp_path, override) != _key(tmp_path)


def test_every_left_out_setting_exists():
    """A misspelt name would leave nothing out, silently."""
    cfg = compose([])
    missing = [n for n in evidence.NOT_TRAINING if OmegaConf.select(cfg, n, default="<none>") == "<none>"]
    assert missing == []


def test_the_data_enter_the_key_by_content_not_by_place(tmp_path):
    cfg = compose(small_overrides(tmp_path))
    one, moved, other = (make_site_cache(tmp_path / d / "site_a", n_patients=6, size=8, seed=s)
                         for d, s in (("one", 0), ("moved", 0), ("other", 1)))
    keys = [evidence._data_key({"site_a": load_site_data(p, cfg)}) for p in (one, moved, other)]
    assert keys[0] == keys[1] != keys[2]
    assert evidence._config_key(cfg, keys[0]) != evidence._config_key(cfg, keys[2])
