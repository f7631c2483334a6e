"""The hospital side of the federation: a Flower ClientApp on the Message API.

Three handlers:
- ``query``: the handshake: the site's feature count (so the server can build the same network) and a
  fingerprint of the feature names (so sites with different radiomics settings are caught early);
- ``train``: load the global shared arrays over the site's own local expert and calibration head, train
  a few steps of the round's phase ("ssl" or "task"), save the local state, reply with ONLY the shared
  arrays and scalar metrics;
- ``evaluate``: the global shared arrays plus the site's local parts, judged on the site's split; only
  aggregate metrics are returned.
Every reply also names the site in a ConfigRecord so the server can keep per-site histories.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from osteo_model import checkpoints, model as osteo, training
from osteofl import protocol
from osteofl.protocol import ARRAYS, CONFIG, ERROR_BUDGET_SPENT, METRICS, NUM_EXAMPLES, PHASE, PROXIMAL_MU, SITE, SPLIT
from osteofl.client.dp import PrivacySession
from osteofl.client.site_session import SiteSession


def _metric_record(values: dict[str, float], num_examples: int) -> MetricRecord:
    """Scalar metrics only; non-finite values become NaN so every site sends the same key set."""
    record = MetricRecord({NUM_EXAMPLES: int(num_examples)})
    for key, value in sorted(values.items()):
        if key in ("num_examples", NUM_EXAMPLES):
            continue
        v = float(value)
        record[key] = v if math.isfinite(v) else float("nan")
    return record


def _reply(message: Message, site: str, metrics: MetricRecord, arrays=None) -> Message:
    content = RecordDict({METRICS: metrics, SITE: ConfigRecord({"name": site})})
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content, reply_to=message)


def handle_query(message: Message, context: Context, extra: Sequence[str] = ()) -> Message:
    session = SiteSession.open(context, extra)
    info = ConfigRecord(
        {
            "name": session.site,
            "n_features": len(session.data.cache.feature_names),
            "features_sha256": checkpoints.features_sha256(session.data.cache.feature_names),
            "payload_sha256": protocol.payload_fingerprint(session.model, session.cfg),
        }
    )
    return Message(RecordDict({SITE: info, METRICS: _feature_moments(session)}), reply_to=message)


def _feature_moments(session: SiteSession) -> MetricRecord:
    """Per-feature count, sum and sum of squares over the site's whole pool: enough for the server to
    standardise the radiomic targets with pooled statistics, and aggregate over hundreds of vertebrae
    (no per-patient value). Split sizes ride along for the run log."""
    f = np.asarray(session.data.cache.features, dtype=np.float64)
    finite = np.isfinite(f)
    f = np.where(finite, f, 0.0)
    record = MetricRecord({f"n_{k}": len(v) for k, v in session.data.splits.items()})
    record[NUM_EXAMPLES] = len(f)
    record["feat_n"] = finite.sum(0).astype(float).tolist()
    record["feat_sum"] = f.sum(0).tolist()
    record["feat_sumsq"] = (f**2).sum(0).tolist()
    return record


def handle_train(message: Message, context: Context, extra: Sequence[str] = ()) -> Message:
    session = SiteSession.open(context, extra)
    config = message.content[CONFIG]
    phase = str(config[PHASE])
    privacy = PrivacySession(session)
    if privacy.budget_spent():
        reason = (
            f"site {session.site}: privacy budget spent (epsilon {session.state.epsilon:.3f} >= "
            f"{session.cfg.privacy.epsilon_budget}); not training any more"
        )
        return Message(Error(code=ERROR_BUDGET_SPENT, reason=reason), reply_to=message)

    protocol.load_payload(session.model, session.cfg, protocol.record_to_numpy(message.content[ARRAYS]))
    recipe = training.Recipe({session.site: session.model}, session.cfg,
                             training.phase_lengths(session.cfg, federated=True), {session.site: session.data})
    recipe.restore(session.state.optimizer)
    recipe.begin(phase, training.index_in_phase(session.cfg, phase, int(config[protocol.ROUND])))
    optimizer = recipe.optimizer
    _attach_proximal_term(optimizer, session, float(config.get(PROXIMAL_MU, 0.0)))
    steps = session.cfg.federation.local_steps
    private = privacy.attach(optimizer, phase)
    metrics = training.train_steps(
        session.model, session.data, session.cfg, phase, optimizer, session.device,
        max_steps=None if steps is None else int(steps), private=private,
    )
    session.state.optimizer = optimizer.state_dict()
    session.state.rounds_trained += 1
    privacy.record(private)
    session.save()
    metrics = {f"train_{k}": v for k, v in metrics.items() if k != "num_examples"}
    metrics["epsilon"] = session.state.epsilon
    record = _metric_record(metrics, num_examples=_pool_size(session, phase))
    return _reply(message, session.site, record, protocol.payload_record(session.model, session.cfg))


def _attach_proximal_term(optimizer: torch.optim.Optimizer, session: SiteSession, mu: float) -> None:
    """FedProx's client side: add mu * (w - w_global) to the shared parameters' gradients before every
    step (the gradient of mu/2 ||w - w_global||^2). Flower's FedProx only sends "proximal-mu"; applying
    it is the client's job. Under DP-SGD the term is added after clipping and noise (it depends on no
    data, so it costs no privacy)."""
    if mu <= 0:
        return
    anchors = [(p, p.detach().clone()) for p in osteo.shared_parameters(session.model)]

    def add_proximal(_optimizer, _args, _kwargs) -> None:
        with torch.no_grad():
            for p, anchor in anchors:
                if p.grad is not None:
                    p.grad.add_(p.detach() - anchor, alpha=mu)

    optimizer.register_step_pre_hook(add_proximal)


def _pool_size(session: SiteSession, phase: str) -> int:
    """Aggregation weight: the size of the site's pool for this phase (FedAvg's n_k)."""
    split = "unlabeled" if phase == "ssl" else "train"
    return len(session.data.splits[split])


def handle_evaluate(message: Message, context: Context, extra: Sequence[str] = ()) -> Message:
    session = SiteSession.open(context, extra)
    split = str(message.content[CONFIG].get(SPLIT, session.cfg.federation.eval_split))
    protocol.load_payload(session.model, session.cfg, protocol.record_to_numpy(message.content[ARRAYS]))
    metrics = training.evaluate(session.model, session.data, session.cfg, split, session.device)
    _keep_site_model(message, session, split, metrics)
    n = int(metrics.get("num_examples", len(session.data.splits.get(split, ()))))
    return _reply(message, session.site, _metric_record(metrics, n))


def _keep_site_model(message: Message, session: SiteSession, split: str, metrics: dict[str, float]) -> None:
    """The newest global shared weights over this site's local parts: the complete model, kept at the site
    with its card (osteo_model.checkpoints) so the hospital can use it after the run."""
    config, cfg, cache = message.content[CONFIG], session.cfg, session.data.cache
    card = checkpoints.site_card(
        cfg.site.state_dir, run_id=str(config.get(protocol.RUN_ID, message.metadata.run_id)),
        rnd=int(config.get(protocol.ROUND, 0)), n_sites=config.get(protocol.N_SITES),
        phases=training.phase_lengths(cfg, federated=True), epsilon=session.state.epsilon, metrics=metrics, split=split)
    checkpoints.save_site_model(cfg.site.state_dir, session.model, site=session.site, feature_names=cache.feature_names,
                                model_cfg=cfg.model, crop=cache.manifest.get("crop"), card=card)


def make_client_app(extra_overrides: Sequence[str] = ()) -> ClientApp:
    """A ClientApp whose handlers compose the config with ``extra_overrides`` (simulation uses this)."""
    client_app = ClientApp()
    extra = tuple(extra_overrides)

    @client_app.query()
    def _query(message: Message, context: Context) -> Message:
        return handle_query(message, context, extra)

    @client_app.train()
    def _train(message: Message, context: Context) -> Message:
        return handle_train(message, context, extra)

    @client_app.evaluate()
    def _evaluate(message: Message, context: Context) -> Message:
        return handle_evaluate(message, context, extra)

    return client_app


app = make_client_app()
