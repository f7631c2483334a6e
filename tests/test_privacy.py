import pytest
import torch
from omegaconf import OmegaConf

from osteo_model import model as osteo
from osteo_model.dataset import load_site_data
from osteo_model.errors import ConfigError, StateError
from osteo_model.privacy import EpsilonAccountant, epsilon_after, make_private
from osteo_model.training import make_loader, make_optimizer, train_steps

from model_helpers import make_caches, tiny_cfg


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    make_caches(root, n_patients=8)
    cfg = tiny_cfg(root, "privacy=dp")
    return cfg, load_site_data(root / "data" / "cache" / "site_a", cfg)


@pytest.mark.parametrize("phase, consistency", [("task", 0.0), ("ssl", 0.0), ("ssl", 1.0)])
def test_one_private_step(site, phase, consistency):
    """(The consistency term's second forward pass once left Opacus without per-sample gradients.)"""
    cfg, data = site
    cfg = OmegaConf.merge(cfg, {"train": {"loss": {"consistency": consistency}}})
    model = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer)
    before = osteo.shared_state(model)
    opt = make_optimizer(model.parameters(), cfg)
    private = make_private(model, opt, make_loader(data, cfg, phase, per_patient=True), cfg.privacy)
    res = train_steps(model, data, cfg, phase, opt, "cpu", max_steps=1, private=private)
    assert res["num_examples"] > 0
    assert private.epsilon() > 0 and private.accountant.steps() == 1
    assert osteo.shared_keys(private.model) == list(before)  # ownership survives the Opacus wrapper
    assert any(not torch.equal(v, osteo.shared_state(model)[k]) for k, v in before.items())
    assert private.release() is model
    again = make_private(model, make_optimizer(model.parameters(), cfg), make_loader(data, cfg, phase, per_patient=True), cfg.privacy)
    # wrapping the same model again in a later round (without release) replaces the old hooks
    make_private(model, make_optimizer(model.parameters(), cfg), make_loader(data, cfg, phase, per_patient=True), cfg.privacy)
    assert again.model._module is model


def test_epsilon_accumulates_across_restored_accountants(site):
    cfg, data = site
    model = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer)
    opt = make_optimizer(model.parameters(), cfg)
    first = make_private(model, opt, make_loader(data, cfg, "task", per_patient=True), cfg.privacy)
    train_steps(model, data, cfg, "task", opt, "cpu", max_steps=2, private=first)
    eps1, state = first.epsilon(), first.accountant.state()
    restored = EpsilonAccountant(state)
    assert restored.epsilon(cfg.privacy.delta) == pytest.approx(eps1)
    opt = make_optimizer(model.parameters(), cfg)
    second = make_private(model, opt, make_loader(data, cfg, "task", per_patient=True), cfg.privacy, accountant_state=state)
    predicted = epsilon_after(cfg.privacy, len(second.data_loader), 2, state)  # what a site checks before a round
    train_steps(model, data, cfg, "task", opt, "cpu", max_steps=2, private=second)
    assert second.accountant.steps() == 4 and second.epsilon() > eps1
    assert second.epsilon() == pytest.approx(predicted)


def test_dp_protects_patients_not_vertebrae(site):
    """The accountant counts the loader's items as records. Over vertebrae a patient would be up to four
    records (group privacy: several times the reported ε); over patients each Poisson step takes a patient at
    most once, with one of its vertebrae, at rate batch / patients."""
    cfg, data = site
    rows = make_loader(data, cfg, "ssl")
    with pytest.raises(ConfigError, match="one item per patient"):
        make_private(osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer),
                     torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), rows, cfg.privacy)
    patient_of = data.cache.table["patient_id"].astype(str).to_numpy()
    ssl_rows = data.splits["unlabeled"]
    n_patients = len(set(patient_of[ssl_rows]))
    assert len(rows.dataset) == len(ssl_rows) > n_patients  # several vertebrae per patient
    model = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer)
    opt = make_optimizer(model.parameters(), cfg)
    private = make_private(model, opt, make_loader(data, cfg, "ssl", per_patient=True), cfg.privacy)
    assert len(private.data_loader.dataset) == n_patients
    drawn = []
    for _ in range(30):
        for batch in private.data_loader:
            patients = patient_of[batch["row"].numpy()]
            assert len(set(patients)) == len(patients)  # no patient twice in one step
            drawn.extend(batch["row"].tolist())
    assert set(drawn) == set(ssl_rows.tolist())  # every vertebra can be drawn: none is left out for good
    train_steps(model, data, cfg, "ssl", opt, "cpu", private=private)  # one round: one pass over the patients
    (noise, rate, steps), = private.accountant.accountant.history
    assert rate == pytest.approx(1 / steps) and steps == -(-n_patients // min(int(cfg.train.batch_size), n_patients))
    # what a site's start-up line states a round costs is what the round spent
    assert epsilon_after(cfg.privacy, steps, steps) == pytest.approx(private.epsilon())


def test_bad_accountant_state_and_batchnorm_rejected(site):
    cfg, data = site
    with pytest.raises(StateError):
        EpsilonAccountant({"mechanism": "gdp", "history": []})
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.BatchNorm3d(4))
    with pytest.raises(ConfigError, match="DP-SGD"):
        make_private(net, torch.optim.SGD(net.parameters(), lr=0.1), make_loader(data, cfg, "task", per_patient=True), cfg.privacy)


def _two_step_update(cfg, data, private: bool) -> dict[str, torch.Tensor]:
    model = osteo.build_model(cfg, data.cache.features.shape[1], data.manufacturer)  # seeds torch with cfg.seed
    opt = make_optimizer(model.parameters(), cfg)
    dp = make_private(model, opt, make_loader(data, cfg, "task", per_patient=True), cfg.privacy) if private else None
    train_steps(model, data, cfg, "task", opt, "cpu", max_steps=2, private=dp)
    if dp is not None:
        dp.release()
    return osteo.shared_state(model)


def test_a_coordinator_that_knows_the_seed_cannot_replay_a_sites_dp_noise(site):
    """The run's seed is the coordinator's. Were the DP noise and Poisson sampling drawn from the generator
    it seeds, the coordinator could replay them from the run's config and subtract the noise from the
    site's update (and each round would draw the same noise, which differencing rounds cancels). Replaying
    the site's computation gives the site's update exactly without DP, and not with it."""
    cfg, data = site
    plain = [_two_step_update(cfg, data, private=False) for _ in range(2)]
    assert all(torch.equal(plain[0][k], plain[1][k]) for k in plain[0])  # the replay itself is exact
    noisy = [_two_step_update(cfg, data, private=True) for _ in range(2)]
    encoder = [k for k in noisy[0] if k.startswith("encoder.")]
    assert encoder and not any(torch.equal(noisy[0][k], noisy[1][k]) for k in encoder)
