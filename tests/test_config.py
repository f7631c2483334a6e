"""The one composed config, its overrides, a site's own settings, and the installed namespace."""
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from osteo_model.config import compose, compose_site, resolve_device
from osteo_model.errors import ConfigError


def test_compose_defaults_and_interpolation() -> None:
    cfg = compose(["paths.root=/data/x", "site.name=h1"])
    assert cfg.site.dir == "/data/x/data/sites/h1"
    assert cfg.site.cache_dir == "/data/x/data/cache/h1"
    assert cfg.crop.size > 0 and cfg.crop.fov_mm > 0


def test_group_override_switches_model() -> None:
    small = compose([])
    large = compose(["model=resnet"])
    assert small.model.encoder != large.model.encoder


def test_unknown_key_is_refused() -> None:
    with pytest.raises(ConfigCompositionException):
        compose(["crop.no_such_key=1"])


@pytest.mark.parametrize("override, problem", [
    ("train.loss.local_prior=-8", "train.loss.local_prior=-8: must be >= 0"),
    ("train.loss.diag=-0.5", "train.loss.diag=-0.5: must be >= 0"),
    ("train.local_lr_factor=-1", "train.local_lr_factor=-1: must be >= 0"),
    ("train.lr=-0.001", "train.lr=-0.001: must be >= 0"),
    ("train.loss.sbmd=nan", "train.loss.sbmd=nan: not a number"),
    ("train.loss.calib=abc", "train.loss.calib='abc': not a number"),
    ("federation.local_steps=0", "federation.local_steps=0: must be >= 1"),
    ("train.batch_size=2.5", "train.batch_size=2.5: not a whole number"),
    ("seed=-1", "seed=-1: must be >= 0"),
    ("privacy=dp privacy.max_grad_norm=-1", "privacy.max_grad_norm=-1: must be > 0"),
    ("privacy=dp privacy.delta=1", "privacy.delta=1: must be > 0 and < 1"),
])
def test_a_training_setting_out_of_range_is_refused_naming_the_key(override, problem) -> None:
    """Every entry point composes through compose(): a negative loss weight is refused there, not trained
    as 'off' by a code path that reads > 0, nor as a loss to maximise by another."""
    with pytest.raises(ConfigError) as err:
        compose(override.split())
    assert str(err.value) == problem
    assert compose(["train.loss.local_prior=0", "train.lr=0"]).train.lr == 0  # zero: off, or frozen
    assert compose(["federation.local_steps=null", "train.final_refit_epochs=0"]).federation.local_steps is None


def test_site_yaml_merges_over_group(tmp_path) -> None:
    site_dir = tmp_path / "data" / "sites" / "h1"
    site_dir.mkdir(parents=True)
    (site_dir / "site.yaml").write_text("label_preset: verse\nmax_dxa_interval_days: 30\n")
    cfg = compose_site([f"paths.root={tmp_path}", "site.name=h1"])
    assert cfg.site.label_preset == "verse"
    assert cfg.site.max_dxa_interval_days == 30
    assert cfg.site.name == "h1"


def test_command_line_wins_over_site_yaml(tmp_path) -> None:
    site_dir = tmp_path / "data" / "sites" / "h1"
    site_dir.mkdir(parents=True)
    (site_dir / "site.yaml").write_text("label_preset: verse\nmax_dxa_interval_days: 30\n")
    cfg = compose_site([f"paths.root={tmp_path}", "site.name=h1", "site.label_preset=plain"])
    assert cfg.site.label_preset == "plain"
    assert cfg.site.max_dxa_interval_days == 30


def test_broken_site_yaml_names_the_file(tmp_path) -> None:
    site_dir = tmp_path / "data" / "sites" / "h1"
    site_dir.mkdir(parents=True)
    (site_dir / "site.yaml").write_text("label_preset: [unclosed\n")
    with pytest.raises(ConfigError, match="site.yaml"):
        compose_site([f"paths.root={tmp_path}", "site.name=h1"])


@pytest.mark.parametrize("text, problem", [
    ("policy:\n  min_cohrt: 30\n", "site.policy.min_cohrt is not a site setting"),  # the cohort would stay 10
    ("policy:\n  compute:\n    max_batch: 8\n", "site.policy.compute.max_batch is not a site setting"),
    ("policy:\nmin_cohort: 30\n", "site.min_cohort is not a site setting"),  # lost indentation
    ("policy:\n", "site.policy is empty"),  # would leave the site with no policy at all
    ("lable_preset: verse\n", "site.lable_preset is not a site setting"),
    ("[verse, 30]\n", "must be a mapping of site settings"),
])
def test_a_site_yaml_setting_that_would_be_ignored_is_refused_naming_the_file(tmp_path, text, problem) -> None:
    """A hospital's policy lives in site.yaml: a mistyped key must not leave the default in force unseen."""
    site_dir = tmp_path / "data" / "sites" / "h1"
    site_dir.mkdir(parents=True)
    (site_dir / "site.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        compose_site([f"paths.root={tmp_path}", "site.name=h1"])
    assert str(err.value).startswith(str(site_dir / "site.yaml")) and problem in str(err.value)


def test_device_auto_resolves() -> None:
    assert resolve_device(compose(["device=cpu"])) == "cpu"
    assert resolve_device(compose([])) in {"cpu", "cuda"}


def test_no_bare_top_level_modules_installed(tmp_path) -> None:
    # The design card's folders install under the osteofl namespace, never as bare `server`/`client`.
    # Run outside the repository so only what is installed can be found.
    probe = (
        "import importlib.util as u;"
        "print([n for n in ('server','client','simulation','configs') if u.find_spec(n)]);"
        "import osteofl.server, osteofl.client, osteofl.simulation, osteofl.configs, osteo_model;print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "ok"]
