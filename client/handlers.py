"""What a site does with each message of the federation (the ClientApp's work, kept out of its module).

Run either inside the ClientApp process (Flower's simulation engine, whose workers stay warm) or inside
the site's long-lived worker (client/worker.py) that ``osteo-client`` starts, so that a deployed message
does not pay torch's imports and the cache loading again. Three handlers:
- ``query``: the handshake: the site's feature count (so the server can build the same network), a
  fingerprint of the feature names (so sites with different radiomics settings are caught early),
  rounded split sizes and the site's compute caps; no feature statistic of any kind (standardisation is
  site-local);
- ``train``: load the global shared arrays over the site's own local expert and calibration head, train
  a few steps of the round's phase ("ssl" or "task"), save the local state, reply with ONLY the shared
  arrays and scalar metrics;
- ``evaluate``: the global shared arrays plus the site's local parts, judged on the site's split; only
  aggregate metrics are returned.
Every reply also names the site in a ConfigRecord so the server can keep per-site histories, and leaves
through ``answer``: the site's own policy (client/policy.py: shared keys only, its DP floor, minimum
cohort, sanitised error texts) and its audit log (client/audit.py).
"""
from __future__ import annotations

import math
from logging import INFO, WARNING
from typing import Callable, Sequence

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore import log

from osteo_model import checkpoints, dataset, proximal, training
from osteo_model import model as osteo
from osteo_model.cache import SiteCache
from osteo_model.errors import OsteoError
from osteofl import protocol
from osteofl.protocol import (
    CONFIG, ERROR_BUDGET_SPENT, ERROR_POLICY_REFUSED, ERROR_SITE_FAILED, METRICS, NUM_EXAMPLES, PHASE,
    PROXIMAL_MU, SITE, SIZES_WITHHELD, SPLIT, WITHHELD,
)
from osteofl.client import audit, policy
from osteofl.client.dp import PrivacySession
from osteofl.client.site_session import SiteSession, own_site_config


def _metric_record(values: dict[str, float], num_examples: int) -> MetricRecord:
    """Scalar metrics only; non-finite values become NaN so every site sends the same key set. The weight
    and every count are rounded up (policy.COUNT_QUANTUM), as in the handshake."""
    record = MetricRecord({NUM_EXAMPLES: policy.rounded_count(num_examples)})
    for key, value in sorted(values.items()):
        if key in ("num_examples", NUM_EXAMPLES):
            continue
        v = float(value)
        if key in policy.COUNT_METRICS and math.isfinite(v):
            v = float(policy.rounded_count(int(v)))
        record[key] = v if math.isfinite(v) else float("nan")
    return record


def _reply(message: Message, site: str, metrics: MetricRecord, arrays: dict | None = None) -> Message:
    content = RecordDict({METRICS: metrics, SITE: ConfigRecord({"name": site})})
    if arrays is not None:
        protocol.put_payload(content, arrays)
    return Message(content, reply_to=message)


def _load_global(message: Message, session: SiteSession) -> None:
    """Load the server's arrays; they must be exactly the payload this site's own config expects, and
    finite: a NaN model would train NaN into the site's own parts, which it keeps."""
    spec = protocol.payload_spec(session.model, session.cfg)
    arrays = protocol.payload_of(message.content, spec)
    if bad := protocol.non_finite(arrays):
        raise policy.PolicyRefusal(f"the global model holds non-finite values in {len(bad)} array(s), e.g. "
                                   f"{bad[0]}: refused, nothing trained or evaluated")
    protocol.load_payload(session.model, session.cfg, arrays)


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
    sizes, withheld = _split_sizes(session)
    info.update(sizes)
    info.update({protocol.CAP_PREFIX + name: cap for name, cap in policy.compute_caps(session.cfg.site.policy).items()})
    if withheld:
        info[SIZES_WITHHELD] = "; ".join(withheld)
    # Flower's weighting key is the only metric; a handshake weighs nothing
    return Message(RecordDict({SITE: info, METRICS: MetricRecord({NUM_EXAMPLES: 1})}), reply_to=message)


def _split_sizes(session: SiteSession) -> tuple[dict[str, int], list[str]]:
    """Split sizes for the run log and the server's weight caps, in vertebrae rounded up to
    policy.COUNT_QUANTUM; a split with fewer patients than the site's minimum cohort is withheld. No
    feature statistic leaves: each site standardises its SSL targets on its own unlabeled rows
    (osteo_model.model.site_feature_stats)."""
    sizes, withheld = {}, []
    for name, rows in sorted(session.data.splits.items()):
        if reason := policy.withheld(session.data, name, session.cfg):
            withheld.append(reason)
        else:
            sizes[f"n_{name}"] = policy.rounded_count(len(rows))
    return sizes, withheld


def _withheld(message: Message, site: str, reason: str) -> Message:
    """A valid reply without any aggregate: the server records the site as withheld, not as failed."""
    content = RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 0}), SITE: ConfigRecord({"name": site, WITHHELD: reason})})
    return Message(content, reply_to=message)


def handle_train(message: Message, context: Context, extra: Sequence[str] = ()) -> Message:
    session = SiteSession.open(context, extra)
    policy.check_train_batch(session.cfg)
    config = message.content[CONFIG]
    phase = str(config[PHASE])
    privacy = PrivacySession(session)
    salt = None if privacy.enabled else session.state.shuffle_salt  # DP draws its batches from the OS's entropy
    per_pass = training.steps_per_pass(session.data, session.cfg, phase, per_patient=privacy.enabled, salt=salt)
    steps = policy.local_steps(session.cfg, per_pass)
    if reason := privacy.refusal(per_pass, steps or per_pass):
        return Message(Error(code=ERROR_BUDGET_SPENT, reason=f"site {session.site}: {reason}"), reply_to=message)
    run_id = _run_id(message, context, session)
    if reason := policy.rounds_spent(session.cfg, session.state.rounds_by_run.get(run_id, 0)):
        return Message(Error(code=ERROR_BUDGET_SPENT, reason=f"site {session.site}: {reason}"), reply_to=message)
    if reason := policy.withheld(session.data, training.phase_split(phase), session.cfg):
        return _withheld(message, session.site, reason)
    policy.check_payload(session.model, session.cfg, protocol.payload_keys(session.model, session.cfg))

    _load_global(message, session)
    if privacy.enabled and session.state.non_private_rounds:
        log(WARNING, "site %s: %d earlier round(s) without DP trained its local parts: DP starts them and the "
                     "optimiser afresh", session.site, session.state.non_private_rounds)
        session.start_local_afresh()
    # under DP no shared parameter starts from the private rows: the sBMD prior (the training patients' mean
    # sBMD, set into the shared head at the first task round) would leave nearly as it is, outside epsilon
    recipe = training.Recipe({session.site: session.model}, session.cfg,
                             training.phase_lengths(session.cfg, federated=True), {session.site: session.data},
                             priors=not privacy.enabled)
    recipe.restore(session.state.optimizer)
    recipe.begin(phase, training.index_in_phase(session.cfg, phase, int(config[protocol.ROUND])))
    optimizer = recipe.optimizer
    proximal.attach_proximal_term(optimizer, session.model, float(config.get(PROXIMAL_MU, 0.0)))
    private = privacy.attach(optimizer, phase)
    metrics = training.train_steps(session.model, session.data, session.cfg, phase, optimizer, session.device,
                                   max_steps=steps, private=private, salt=salt, pass_index=int(config[protocol.ROUND]))
    update = protocol.payload_arrays(session.model, session.cfg)
    if bad := protocol.non_finite({**osteo.local_state(session.model), **update}):
        # a finite but poisoned global model (or a diverging step) must not become the site's saved state
        raise OsteoError(None, f"training this round diverged (non-finite values in {len(bad)} array(s), e.g. "
                               f"{bad[0]}): nothing saved, nothing sent; the site's state is as before the round")
    session.state.optimizer = optimizer.state_dict()
    session.state.rounds_trained += 1
    session.state.non_private_rounds += private is None
    session.state.rounds_by_run[run_id] = session.state.rounds_by_run.get(run_id, 0) + 1
    privacy.record(private)
    session.save()
    # under DP only the noised update and ε leave: a loss computed on the private rows is a release that
    # ε does not cover (NaN keeps every site's key set the same)
    metrics = {f"train_{k}": math.nan if private is not None else v for k, v in metrics.items() if k != "num_examples"}
    metrics["epsilon"] = session.state.epsilon
    record = _metric_record(metrics, num_examples=_pool_size(session, phase))
    return _reply(message, session.site, record, update)


def _run_id(message: Message, context: Context, session: SiteSession) -> str:
    """The federation's run as the coordinator names it (the server's id, kept across a resume, which is a
    new Flower run; Flower's where it sends none), held to one name per Flower run in the site's state: the
    round budget (``max_rounds``) and the kept site model are counted per run, so a coordinator that renamed
    its run each round would reset both. A renamed run is refused."""
    declared = str(message.content[CONFIG].get(protocol.RUN_ID, context.run_id))
    flower = str(context.run_id)
    named = session.state.run_names.get(flower)
    if named is None:
        session.state.run_names[flower] = declared
        # not session.save(): an evaluation's refit must not reach the state; nothing trained: the backup stays
        session.store.save(session.state, keep_previous=False)
    elif named != declared:
        raise policy.PolicyRefusal(f"the coordinator named this run {named!r} to this site and now names it "
                                   f"{declared!r}: a site counts its round budget and keeps its model per run, "
                                   "so a run that changes its name is refused")
    return declared


def _pool_size(session: SiteSession, phase: str) -> int:
    """Aggregation weight: the size of the site's pool for this phase (FedAvg's n_k)."""
    return len(training.phase_rows(session.data, phase))


def handle_evaluate(message: Message, context: Context, extra: Sequence[str] = ()) -> Message:
    """Judge the round's global model (its shared weights over this site's local parts) on the requested
    split and keep it as the site model if it is the best so far (_keep_site_model). An evaluation on
    another split (the run's final one, on test) judges the model the site keeps, after its final local
    refit where ``train.final_refit_epochs`` asks for one, so the run reports what each hospital goes home
    with; the round of that model goes with the metrics."""
    session = SiteSession.open(context, extra)
    config = message.content[CONFIG]
    split = str(config.get(SPLIT, session.cfg.federation.eval_split))
    policy.check_eval_split(split)
    run_id = _run_id(message, context, session)
    _count_evaluation(session, run_id)
    _load_global(message, session)
    if split == "val":
        metrics = training.evaluate(session.model, session.data, session.cfg, split, session.device)
        _keep_site_model(message, session, run_id, split, metrics)
    else:  # judged here: the kept model, or the global one where the run keeps none judged yet
        kept, replaced = _keep_site_model(message, session, run_id, split, {})
        if not replaced:
            _load_site_model(session)
        _refit_site_model(session, kept)
        metrics = {**training.evaluate(session.model, session.data, session.cfg, split, session.device),
                   protocol.SITE_MODEL_ROUND: float(kept["round"])}
    if reason := policy.withheld(session.data, split, session.cfg):
        return _withheld(message, session.site, reason)
    n = int(metrics.get("num_examples", len(session.data.splits.get(split, ()))))
    metrics = policy.without_small_subgroups(metrics, session.data, split, session.cfg)
    return _reply(message, session.site, _metric_record(metrics, n))


def _count_evaluation(session: SiteSession, run_id: str) -> None:
    """Refuse an evaluation beyond the site's ``max_evaluations`` for the run; where the site sets that cap,
    count this one first, before anything is computed, so that a crash after the reply left cannot hand
    out an evaluation that was never counted."""
    done = session.state.evaluations_by_run.get(run_id, 0)
    if reason := policy.evaluations_spent(session.cfg, done):
        raise policy.PolicyRefusal(reason)
    if "max_evaluations" in policy.compute_caps(session.cfg.site.policy):
        session.state.evaluations_by_run[run_id] = done + 1
        session.store.save(session.state, keep_previous=False)  # as in _run_id


def _keep_site_model(message: Message, session: SiteSession, run_id: str, split: str,
                     metrics: dict[str, float]) -> tuple[dict, bool]:
    """Keep the evaluated model (the global shared weights over this site's local parts: a complete model)
    with its card (osteo_model.checkpoints) so the hospital can use it after the run, if it predicts the
    site's own validation patients better than the model kept so far in this run (a task-phase round
    judged on "val"; the newest model while none is judged). ``metrics``: its metrics on ``split`` (none
    off "val": not judged). Returns the kept model's card and whether it is the one in the session."""
    config, cfg = message.content[CONFIG], session.cfg
    rnd = int(config.get(protocol.ROUND, 0))
    judged = split == "val" and protocol.phase_of(rnd, cfg) == "task"
    score = float(metrics.get(training.SELECTION_METRIC, math.nan)) if judged else math.nan
    score = score if math.isfinite(score) else None
    kept = checkpoints.kept_card(cfg.site.state_dir, run_id)
    if not checkpoints.replaces_kept(kept, score):
        return kept, False
    if kept is None and (done := checkpoints.set_aside_other_run(cfg.site.state_dir, run_id)):
        log(INFO, "site %s: %s (run %s keeps its own)", session.site, done, run_id)
    card = checkpoints.site_card(
        kept, run_id=run_id, rnd=rnd, n_sites=config.get(protocol.N_SITES),
        phases=training.phase_lengths(cfg, federated=True), epsilon=session.state.epsilon, metrics=metrics, split=split,
        selection={"metric": training.SELECTION_METRIC, "split": "val", "score": score})
    _save_site_model(session, card)
    return card, True


def _save_site_model(session: SiteSession, card: dict) -> None:
    """Save the session's model as the site model; its card records the validation patients it was
    selected on and the pinned split it trained on (osteo-predict's intervals come from validation
    residuals: screening.site_reference)."""
    cache = session.data.cache
    card[checkpoints.VAL_PATIENTS] = dataset.patients_sha256(session.data, "val")
    card[checkpoints.SPLIT_PIN] = session.data.split_id
    checkpoints.save_site_model(session.cfg.site.state_dir, session.model, site=session.site,
                                feature_names=cache.feature_names, model_cfg=session.cfg.model,
                                crop=cache.manifest.get("crop"), card=card)


def _refit_site_model(session: SiteSession, card: dict) -> None:
    """The final local refit of the kept site model in the session (``train.final_refit_epochs``;
    training.final_refit: local parts only, an epoch kept only where the site's validation patients
    improve), once per kept model: its card records the epoch kept (0: none), so a repeated final
    evaluation does not refit the refitted model. ``card`` is updated in place. None under DP."""
    if "refit" in card or session.cfg.privacy.enabled:
        # under DP the refit would train on the training patients outside epsilon, and the test metrics
        # that leave would judge it: a site under DP goes home with the model its DP rounds made
        return
    epoch = training.final_refit(session.model, session.data, session.cfg, session.device, salt=session.state.shuffle_salt)
    if epoch is None:
        return
    card["refit"] = {"epochs": int(session.cfg.train.final_refit_epochs), "kept_epoch": int(epoch)}
    _save_site_model(session, card)


def _load_site_model(session: SiteSession) -> None:
    """Put the site model kept in the state folder (shared weights and this site's local parts) into the
    session's network."""
    state = checkpoints.load_model_state(session.cfg.site.state_dir)
    osteo.load_shared(session.model, state["shared"])
    osteo.load_local(session.model, state["local"][session.site])


Handler = Callable[[Message, Context, Sequence[str]], Message]
HANDLERS: dict[str, Handler] = {"query": handle_query, "train": handle_train, "evaluate": handle_evaluate}
"""Message type -> handler; the same for the in-process ClientApp and the site worker."""


def answer(kind: str, message: Message, context: Context, extra: Sequence[str] = ()) -> Message:
    """Run a handler and vet what leaves the site: a policy refusal or any failure becomes an Error reply
    whose reason is sanitised (no paths, no patient or study ids; Flower would otherwise send the raw
    exception text), refusals and withheld replies are logged here, and every reply is appended to the
    site's audit log before it is sent. The message's instructions are type-checked first
    (policy.check_config), so that nothing after the handler can fail on them."""
    config = message.content.config_records.get(CONFIG) if not message.has_error() else None
    try:
        policy.check_config(config, kind)
        reply = HANDLERS[kind](message, context, extra)
    except policy.PolicyRefusal as exc:
        reply = Message(Error(code=ERROR_POLICY_REFUSED, reason=exc.reason), reply_to=message)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the server gets a clean one-line reason
        log(WARNING, "%s failed at this site: %s: %s", kind, type(exc).__name__, exc)
        reply = Message(Error(code=ERROR_SITE_FAILED, reason=f"{type(exc).__name__}: {exc}"), reply_to=message)
    try:  # the site's own config says where to audit, even when the run's request was refused
        site, cfg = own_site_config(context, extra)
    except Exception:  # noqa: BLE001 - a broken config is already in the reply
        site, cfg = str(context.node_config.get(protocol.NODE_SITE, "unknown")), None
    if reply.has_error():
        reason = policy.sanitise(reply.error.reason, _identifiers(cfg))
        reply = Message(Error(code=reply.error.code, reason=reason), reply_to=message)
        if reply.error.code == ERROR_POLICY_REFUSED:
            log(WARNING, "site %s REFUSED %s: %s", site, kind, reason)
    elif reason := protocol.withheld_reason(reply):
        log(INFO, "site %s withheld its %s aggregates: %s", site, kind, reason)
    state_dir = cfg.site.state_dir if cfg is not None else context.node_config.get(protocol.NODE_STATE_DIR)
    rnd = config.get(protocol.ROUND) if config is not None else None
    if state_dir:  # a round refused as not an int is audited as none
        audit.append(state_dir, audit.entry(reply, site=site, kind=kind, rnd=rnd if type(rnd) is int else None))
    else:
        log(WARNING, "site %s: no state folder known, %s reply not audited", site, kind)
    return reply


def _identifiers(cfg) -> set[str]:
    """The site's patient and study ids (to scrub from error texts); none when the cache cannot be read."""
    try:
        table = SiteCache.open(cfg.site.cache_dir).table
        return {str(v) for col in ("patient_id", "study_id") if col in table for v in table[col].dropna()}
    except Exception:  # noqa: BLE001 - a broken cache: paths are scrubbed anyway
        return set()
