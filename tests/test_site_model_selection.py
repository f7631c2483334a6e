"""The model a hospital goes home with (client/handlers.py, osteo_model.checkpoints.replaces_kept): each
site keeps the task round whose model predicts its own validation patients best, the benchmark's model
selection, so a coordinator that sends a bad model at the end cannot replace it, and the run's final
test evaluation judges the model each site keeps."""
from __future__ import annotations

import json
import math
import stat
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MessageType

from federation_helpers import LocalGrid, make_caches, small_overrides
from osteo_model.checkpoints import (MODEL_CARD_FILE, PREVIOUS_MODEL_CARD_FILE, PREVIOUS_SITE_MODEL_FILE,
                                     SITE_MODEL_FILE, load_model_state, replaces_kept)
from osteo_model.config import compose
from osteo_model.dataset import load_site_data
from osteo_model.evaluate import evaluate_checkpoint
from osteo_model.training import SELECTION_METRIC
from osteofl import protocol
from osteofl.client.client_app import make_client_app
from osteofl.server import checkpoint as ckpt
from osteofl.server.server_app import Federation

pytestmark = pytest.mark.usefixtures("task_identity")
TWO = {"site_a": "hologic", "site_b": "ge_lunar"}
ROUNDS = {"federation.ssl_rounds": 1, "federation.task_rounds": 3}
LAST = 4


def test_a_candidate_replaces_the_kept_model_only_when_its_own_validation_improves() -> None:
    judged = {"round": 3, "selection": {"score": 0.05}}
    assert replaces_kept(None, None) and replaces_kept(None, 0.2)  # nothing kept in this run yet
    assert replaces_kept({"round": 1, "selection": {"score": None}}, None)  # newest while nothing is judged
    assert replaces_kept(judged, 0.04)
    assert not replaces_kept(judged, 0.05) and not replaces_kept(judged, 0.06)
    assert not replaces_kept(judged, None) and not replaces_kept(judged, math.nan)  # unjudged never wins


class PoisonLastEvaluation(LocalGrid):
    """A coordinator that, in the last round's validation, sends every site a ruined model (shared weights
    scaled by 3): what a bug or an attacker upstream could deliver at the end of a run."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for msg in messages:
            config = msg.content.config_records.get(protocol.CONFIG)
            if (msg.metadata.message_type == MessageType.EVALUATE and int(config[protocol.ROUND]) == LAST
                    and config[protocol.SPLIT] == "val"):
                (name,) = msg.content.array_records
                arrays = protocol.payload_of(msg.content)
                del msg.content[name]
                protocol.put_payload(msg.content, {k: v * np.float32(3) for k, v in arrays.items()}, name)
        return super().send_and_receive(messages, timeout=timeout)


@pytest.fixture
def ruined_run(tmp_path: Path, monkeypatch):
    """The run's files, and every evaluation each site made: (site, split) in order."""
    from osteo_model import training

    root = make_caches(tmp_path, TWO)
    overrides = small_overrides(root, **ROUNDS, **{"federation.sites": "[site_a,site_b]"})
    grid = PoisonLastEvaluation(make_client_app(overrides), TWO)
    evaluated, real = [], training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda model, data, cfg, split, device: (
        evaluated.append((data.site, split)) or real(model, data, cfg, split, device)))
    Federation(grid, compose(overrides)).run()
    out = root / "outputs" / "federated"
    return (root, overrides, json.loads((out / "history.json").read_text()),
            json.loads((out / "final_metrics.json").read_text()), evaluated)


def test_each_site_keeps_its_best_validation_round_and_the_final_evaluation_judges_it(ruined_run) -> None:
    root, overrides, history, final, evaluated = ruined_run
    cfg = compose(overrides)
    assert sorted(e for e in evaluated if e[1] == "test") == [("site_a", "test"), ("site_b", "test")]  # one pass each
    for site in TWO:
        scores = {r["round"]: r["site_eval"][site][SELECTION_METRIC] for r in history if r["phase"] == "task"}
        assert scores[LAST] > 1.5 * min(scores[r] for r in scores if r < LAST)  # the ruined model is visibly worse
        card = json.loads((root / "data" / "state" / site / MODEL_CARD_FILE).read_text())
        best = min(scores, key=scores.get)
        assert card["round"] == best < LAST and card["selection"]["metric"] == SELECTION_METRIC
        assert math.isclose(card["selection"]["score"], scores[best], rel_tol=1e-6)
        assert card["validation_metrics"][SELECTION_METRIC] == card["selection"]["score"]
        # the final test evaluation (on the server's true last aggregate) judged the kept model, and says so
        assert final["sites"][site][protocol.SITE_MODEL_ROUND] == best
        state = load_model_state(root / "data" / "state" / site)
        got = evaluate_checkpoint(state, cfg, {site: load_site_data(root / "data" / "cache" / site, cfg)}, "test")[site]
        for key in ("mae_bmd", SELECTION_METRIC, "auc"):
            assert math.isclose(got[key], final["sites"][site][key], rel_tol=1e-5, abs_tol=1e-7), key


def test_a_new_run_starts_its_own_selection(ruined_run) -> None:
    """A kept model belongs to its run: the next run keeps its own, however good the last one was, and sets
    the last one aside rather than destroy it (its first model is unjudged, and a coordinator's to choose)."""
    root, overrides, *_ = ruined_run
    state = root / "data" / "state" / "site_a"
    first_model, first_card = (state / SITE_MODEL_FILE).read_bytes(), (state / MODEL_CARD_FILE).read_text()
    grid = LocalGrid(make_client_app(overrides), TWO)
    Federation(grid, compose([*overrides, "federation.run_name=second", "federation.task_rounds=1"]), run_id=2).run()
    card = json.loads((state / MODEL_CARD_FILE).read_text())
    assert card["run_id"] == "2" and card["round"] == 2
    assert (state / PREVIOUS_SITE_MODEL_FILE).read_bytes() == first_model
    assert (state / PREVIOUS_MODEL_CARD_FILE).read_text() == first_card
    assert all(stat.S_IMODE((state / f).stat().st_mode) == 0o600 for f in (SITE_MODEL_FILE, MODEL_CARD_FILE))


class SnapshotBeforeFinal(LocalGrid):
    """Copies each site's kept model just before the run's final (test) evaluation reaches the sites."""

    def __init__(self, app, sites, state_root: Path) -> None:
        super().__init__(app, sites)
        self.state_root, self.before = state_root, {}

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        configs = [m.content.config_records.get(protocol.CONFIG) for m in messages]
        if not self.before and any(c is not None and c.get(protocol.SPLIT) == "test" for c in configs):
            self.before = {s: load_model_state(self.state_root / s) for s in TWO}
        return super().send_and_receive(messages, timeout=timeout)


def test_a_final_local_refit_changes_only_the_local_parts_once_and_is_what_the_final_evaluation_judges(tmp_path) -> None:
    """``train.final_refit_epochs``: at the final evaluation each site refits the local parts of the model it
    kept (an epoch kept only where its validation patients improve), saves it with the refit on its card, and
    the final metrics are that model's. Asked again (a repeated final evaluation), it does not refit again.
    site_a's DXA reads 0.3 g/cm^2 high (a device offset 4 short rounds leave partly unlearned): its refit is
    kept; site_b's (nothing left to learn from 64 training vertebrae) is not."""
    from osteo_model.cache import SiteCache, write_site_cache

    root = make_caches(tmp_path, TWO)
    path = root / "data" / "cache" / "site_a"
    cache = SiteCache.open(path)
    write_site_cache(path, cache.table.assign(bmd=cache.table["bmd"] + 0.3), np.asarray(cache.crops),
                     np.asarray(cache.masks), np.asarray(cache.features), cache.feature_names, cache.manifest)
    overrides = small_overrides(root, **ROUNDS, **{"federation.sites": "[site_a,site_b]", "train.final_refit_epochs": 3})
    cfg = compose(overrides)
    grid = SnapshotBeforeFinal(make_client_app(overrides), TWO, root / "data" / "state")
    fed = Federation(grid, cfg)
    fed.run()
    final = json.loads((root / "outputs" / "federated" / "final_metrics.json").read_text())
    for site in TWO:
        folder = root / "data" / "state" / site
        card, state, before = json.loads((folder / MODEL_CARD_FILE).read_text()), load_model_state(folder), grid.before[site]
        assert card["refit"]["epochs"] == 3 and (card["refit"]["kept_epoch"] > 0) == (site == "site_a")
        assert all(np.array_equal(v, before["shared"][k]) for k, v in state["shared"].items())
        local_moved = any(not np.array_equal(v, before["local"][site][k]) for k, v in state["local"][site].items())
        assert local_moved == (card["refit"]["kept_epoch"] > 0)
        data = {site: load_site_data(root / "data" / "cache" / site, cfg)}
        val = {name: evaluate_checkpoint(s, cfg, data, "val")[site][SELECTION_METRIC] for name, s in (("now", state), ("was", before))}
        assert val["now"] < val["was"] if local_moved else val["now"] == pytest.approx(val["was"])
        got = evaluate_checkpoint(state, cfg, data, "test")[site]
        assert math.isclose(got["mae_bmd"], final["sites"][site]["mae_bmd"], rel_tol=1e-5, abs_tol=1e-7)
    model_bytes = {s: (root / "data" / "state" / s / "site_model.pt").read_bytes() for s in TWO}
    fed.evaluate(LAST, ckpt.load_latest(root / "outputs" / "federated" / "checkpoints").arrays, "test")
    assert all((root / "data" / "state" / s / "site_model.pt").read_bytes() == b for s, b in model_bytes.items())
