"""The coordinating site's Flower ServerApp: two phases (federated self-supervision, then multi-task) with
one of Flower's strategies, aggregating only the shared arrays.

The round loop is ours, the aggregation is Flower's: each round calls the strategy's
``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` / ``aggregate_evaluate`` exactly as
``Strategy.start`` does, but (a) runs through both phases under one global round counter, (b) screens
every reply first (a malformed or non-finite update is logged and left out, a failed site is reported)
and gives the strategy copies of what was screened, (c) keeps each site's own metrics, (d) asks only the
sites admitted at the handshake, and (e) checkpoints after every round, so that ``--resume`` can carry on
at ``round + 1`` (``Strategy.start`` has no start-round argument).
"""
from __future__ import annotations

import shlex
import time
from collections import Counter
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from omegaconf import DictConfig

from osteo_model import model as osteo, training
from osteo_model.checkpoints import model_meta
from osteo_model.config import compose
from osteo_model.constants import HUI_1997
from osteo_model.errors import ConfigError, StateError
from osteofl import protocol
from osteofl.flower_waits import cap_pull_backoff
from osteofl.protocol import CONFIG, N_SITES, NUM_EXAMPLES, OVERRIDES, PHASE, RESUME, ROUND, RUN_ID, SPLIT, phase_of
from osteofl.server import checkpoint as ckpt, robust
from osteofl.server.history import History, write_json
from osteofl.server.identity import Identities
from osteofl.server.reply_poll import ShortPollGrid
from osteofl.server.screening import Screened, for_strategy, metrics_of, screen, site_info, site_text
from osteofl.server.strategies import build_strategy, min_robust_replies, restore_strategy_state, strategy_state

ANY_MANUFACTURER = sorted(HUI_1997)[0]
"""Shared arrays do not depend on the DXA manufacturer (it only sets local parts), so the server builds
its reference model with any known one."""


HANDSHAKE_RETRY_S = 5.0
"""Pause before the handshake asks again, while fewer sites than needed have answered."""


def run_config_overrides(context: Context, extra: Sequence[str] = ()) -> list[str]:
    out = shlex.split(str(context.run_config.get(OVERRIDES, "") or "")) + list(extra)
    if str(context.run_config.get(RESUME, "false")).lower() in ("1", "true", "yes"):
        out.append("federation.resume=true")
    return out


def run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.outputs) / str(cfg.federation.run_name)


class Federation:
    """One federated run on a Grid (deployment or simulation)."""

    def __init__(self, grid: Grid, cfg: DictConfig, run_id: int = 0) -> None:
        self.grid, self.cfg, self.run_id = grid, cfg, int(run_id)
        self.fed = cfg.federation
        for key, split in (("eval_split", self.fed.eval_split), ("final_eval_split", self.fed.final_eval_split or "test")):
            if split not in protocol.HELD_OUT_SPLITS:  # every site would refuse it
                raise ConfigError(None, f"federation.{key}={split}: sites report metrics on their held-out patients "
                                        f"only ({', '.join(protocol.HELD_OUT_SPLITS)})")
        self.total_rounds = int(self.fed.ssl_rounds) + int(self.fed.task_rounds)
        self.timeout = float(self.fed.round_timeout)
        self.dir = run_dir(cfg)
        self.ckpt_dir = self.dir / "checkpoints"
        self.strategy = build_strategy(cfg)
        self.robust = robust.RobustConfig.from_cfg(self.fed.get("robust") or {})
        self.identities = Identities(grid, str(self.fed.identity), cfg.paths.pki)
        self.identity: dict[int, str] = self.identities.identity  # node id -> site, bound to its key at the handshake
        self.site_sizes: dict[str, dict[str, Any]] = {}  # site -> split sizes it reported at the handshake
        self.refused_at_handshake: dict[str, str] = {}  # site -> why this run's handshake refused it
        self.spent: set[int] = set()  # nodes whose privacy or compute budget is spent: they never train again in this run

    def name_of(self, node_id: int) -> str:
        """The site a node is (its registered key, or in simulation its first declared name; server/identity.py),
        ``node-<id>`` if it was never identified. A reply's own claim is not trusted."""
        return self.identities.name_of(node_id)

    def round_config(self, values: dict[str, Any]) -> ConfigRecord:
        """The server's CONFIG record of a train/evaluate message: the round's values plus the run's identity."""
        return ConfigRecord({**values, RUN_ID: str(self.run_id), N_SITES: len(self.identities.sources)})

    # --- start --------------------------------------------------------------------------------------
    def wait_for_sites(self) -> list[int]:
        need = int(self.fed.min_available_nodes)
        while len(nodes := list(self.grid.get_node_ids())) < need:
            log(INFO, "waiting for sites: %d connected, %d needed", len(nodes), need)
            time.sleep(1.0)
        return nodes

    def handshake(self) -> tuple[int, dict[str, Any]]:
        """Ask every connected site for its feature count, fingerprints and (rounded) split sizes. No feature
        statistic is asked for: each site standardises its SSL targets on its own rows.

        A site whose node was listed but never answered itself is asked again, with any site that
        connected since, until federation.min_available_nodes have answered or federation.round_timeout
        has passed: a SuperLink that restarted lists the sessions of the sites' previous SuperNodes as
        connected for about a minute (Flower's heartbeat), answers for them that the node is unavailable,
        and only then lets the sites' new sessions in. Sites that answered - a refusal too - are not asked
        again; when every site asked answered and too few usably, the run stops at once.

        Only the sites whose handshake is accepted take part in the run (``Identities.admitted``): a site
        that failed it, sent a malformed one, or disagrees on the feature set or the network (``mismatched``)
        is refused by name, and the run goes on with the others."""
        need, deadline = int(self.fed.min_available_nodes), time.monotonic() + self.timeout
        accepted: dict[int, Message] = {}
        answered: set[int] = set()
        while True:
            ask = [n for n in self.wait_for_sites() if n not in answered]
            msgs = [Message(RecordDict({CONFIG: ConfigRecord({PHASE: "handshake"})}), dst_node_id=n,
                            message_type=MessageType.QUERY) for n in ask]
            replies = self.screened(msgs, list(self.grid.send_and_receive(msgs, timeout=self.timeout)), None,
                                    handshake=True)
            accepted |= {int(m.metadata.src_node_id): m for m in replies.accepted}
            silent = set(ask) & replies.silent
            answered |= set(ask) - silent
            for f in replies.failed + replies.rejected:
                if int(f["node"]) in silent:  # asked again below
                    log(WARNING, "handshake: site %s did not answer: %s", f["site"], f["reason"])
                else:
                    self.refuse(int(f["node"]), f["reason"])
            if len(accepted) >= need:
                break
            if not silent or time.monotonic() >= deadline:
                raise ConfigError(None, f"handshake: only {len(accepted)} sites answered usably"
                                        + (f", {len(silent)} never answered within federation.round_timeout="
                                           f"{self.timeout:g} s" if silent else "")
                                        + f"; federation.min_available_nodes={need}")
            log(INFO, "handshake: %d of %d sites answered, %d node(s) did not (a restarted SuperLink's stale "
                "sessions?); asking the sites connected by then in %g s", len(accepted), need, len(silent),
                HANDSHAKE_RETRY_S)
            time.sleep(HANDSHAKE_RETRY_S)
        for node in sorted(set(accepted) - self.identities.admitted()):
            self.refuse(node, "it declares no site name")
        def usable() -> dict[int, ConfigRecord]:  # each one checked by screening.handshake_problem
            return {n: site_info(m) for n, m in accepted.items() if n in self.identities.admitted()}

        n_features = self.mismatched(usable())
        infos = {self.name_of(n): info for n, info in usable().items()}
        self.enough_usable(len(infos))
        sizes = {site: {k: i[k] for k in protocol.SPLIT_SIZES if k in i} for site, i in infos.items()}
        withheld = {site: site_text(i[protocol.SIZES_WITHHELD]) for site, i in infos.items() if protocol.SIZES_WITHHELD in i}
        log(INFO, "handshake: %d sites %s%s", len(infos), sizes, f"; withheld {withheld}" if withheld else "")
        for site, info in sorted(infos.items()):
            self.log_caps(site, info)
        return n_features, sizes

    def mismatched(self, infos: dict[int, ConfigRecord]) -> int:
        """The run's feature count. A site whose radiomic feature set (count and fingerprint) is not the one a
        majority of the sites share, or whose network differs from the server's, is refused by name; with no
        majority there is no feature set to train on, and the run stops (ConfigError)."""
        self.enough_usable(len(infos))
        fingerprints = {n: (i["n_features"], i["features_sha256"]) for n, i in infos.items()}
        ((n_features, self.features_sha256), votes), = Counter(fingerprints.values()).most_common(1)
        if 2 * votes <= len(fingerprints):
            raise ConfigError(None, "handshake: no majority of the sites shares one radiomic feature set ("
                                    + ", ".join(f"{self.name_of(n)}: {k} features {sha[:12]}"
                                                for n, (k, sha) in sorted(fingerprints.items()))
                                    + "): prepare every site with the same radiomics config")
        mine = protocol.payload_fingerprint(self.reference_model(n_features), self.cfg)
        for node, info in sorted(infos.items()):
            if fingerprints[node] != (n_features, self.features_sha256):
                k, sha = fingerprints[node]
                self.refuse(node, f"its radiomic feature set ({k} features, {sha[:12]}) is not the majority's "
                                  f"({n_features}, {self.features_sha256[:12]}): prepare it with the run's radiomics config")
            elif info["payload_sha256"] != mine:
                self.refuse(node, "it builds a different network than the server (model config or osteofl version differs)")
        return n_features

    def enough_usable(self, usable: int) -> None:
        """Stop the run (ConfigError) when fewer sites than federation.min_available_nodes passed the handshake."""
        if usable < max(1, int(self.fed.min_available_nodes)):
            raise ConfigError(None, f"handshake: {usable} site(s) usable, fewer than federation.min_available_nodes="
                                    f"{self.fed.min_available_nodes}; refused: "
                                    + "; ".join(f"{s}: {r}" for s, r in sorted(self.refused_at_handshake.items())))

    def refuse(self, node: int, reason: str) -> None:
        """Leave a node that failed the handshake out of the run, by name (logged, in ``final_metrics.json``)."""
        if node in self.identities.admitted():  # an unidentified node is never admitted anyway
            self.identities.refuse(node, reason)
        self.refused_at_handshake[self.name_of(node)] = reason
        log(WARNING, "handshake: site %s REFUSED for this run: %s", self.name_of(node), reason)

    def log_caps(self, site: str, info: ConfigRecord) -> None:
        """Say where a site's compute caps (client/policy.py) cut what this run asks of it: the site trains
        that much less, whatever the run config says."""
        prefix = protocol.CAP_PREFIX
        caps = {k.removeprefix(prefix): v for k, v in info.items() if k.startswith(prefix)}
        cut = protocol.cut_by_caps(self.cfg, caps)
        if caps.get("max_rounds", self.total_rounds) < self.total_rounds:
            cut["train rounds"] = (self.total_rounds, caps["max_rounds"])
        evaluations = self.total_rounds + bool(self.fed.final_eval_split)
        if caps.get("max_evaluations", evaluations) < evaluations:
            cut["evaluations"] = (evaluations, caps["max_evaluations"])
        if cut:
            log(WARNING, "handshake: site %s's policy caps %s", site, "; ".join(
                f"{key} at {cap} (this run asks {'one pass' if asked is None else asked})"
                for key, (asked, cap) in cut.items()))

    def check_resumable(self, last: ckpt.Checkpoint, n_features: int) -> None:
        """A resumed run starts with the handshake too (so a restarted SuperLink's stale sessions are waited
        out, as in a fresh run), and goes on only where the sites' radiomic features and this config's
        network are those the checkpoint was trained with: re-prepared sites or a changed model config would
        otherwise fail deep inside the first round, or train on features the model never saw."""
        was = (int(last.meta.get("n_features", -1)), str(last.meta.get("features_sha256")))
        if was != (n_features, self.features_sha256):
            raise ConfigError(self.ckpt_dir, f"the sites' radiomic feature set ({n_features} features, "
                                             f"{self.features_sha256[:12]}) is not the one this run was trained on "
                                             f"({was[0]}, {was[1][:12]}): prepare them with the run's radiomics config, "
                                             "or start a fresh run")
        want = {k: v.shape for k, v in protocol.payload_arrays(self.reference_model(n_features), self.cfg).items()}
        have = {k: np.shape(v) for k, v in last.arrays.items()}
        if want != have:
            differ = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
            raise ConfigError(self.ckpt_dir, f"the checkpoint's shared arrays do not fit this config's network "
                                             f"({len(differ)} differ, e.g. {differ[0]}): resume with the model "
                                             "config the run was started with, or start a fresh run")

    def reference_model(self, n_features: int) -> torch.nn.Module:
        return osteo.build_model(self.cfg, n_features, ANY_MANUFACTURER)

    def initial_arrays(self, n_features: int) -> tuple[dict[str, np.ndarray], int]:
        """Global arrays of a fresh model; also the whole model's bytes."""
        model = self.reference_model(n_features)
        whole = sum(v.numel() * v.element_size() for v in model.state_dict().values())
        return protocol.payload_arrays(model, self.cfg), int(whole)

    def start_state(self) -> tuple[int, dict[str, np.ndarray], History, dict[str, Any]]:
        """(first round to run, arrays, history, meta) from the handshake, and from a checkpoint that still fits
        the sites and the config where the run resumes."""
        if self.fed.resume:
            last = ckpt.load_latest(self.ckpt_dir)
            if last is None:
                raise StateError(self.ckpt_dir, "nothing to resume: no checkpoint here")
            if bad := protocol.non_finite(last.arrays):
                # the server never checkpoints a non-finite aggregate (robust.aggregate_problem): damage
                raise StateError(ckpt.checkpoint_path(self.ckpt_dir, last.round),
                                 f"non-finite values in {len(bad)} shared array(s), e.g. {bad[0]}: a damaged "
                                 "checkpoint; move it aside to resume from the round before")
            if last.meta.get("strategy") != str(self.fed.strategy):
                raise ConfigError(None, f"checkpoint was made with strategy {last.meta.get('strategy')!r}, "
                                        f"config says {self.fed.strategy!r}")
            n_features, sizes = self.handshake()
            self.check_resumable(last, n_features)
            restore_strategy_state(self.strategy, last.strategy_state, protocol.packed_shapes(last.arrays), self.ckpt_dir)
            log(INFO, "resuming after round %d (%s phase) from %s", last.round, last.phase, self.ckpt_dir)
            # the run the sites know: a resumed run is the same run to them (their model selection goes on)
            self.run_id = int(last.meta.get("run_id", self.run_id))
            meta = {**last.meta, "site_sizes": {**(last.meta.get("site_sizes") or {}), **sizes}}
            return last.round + 1, last.arrays, History(last.meta.get("history")), meta
        if ckpt.list_checkpoints(self.ckpt_dir):  # keep an earlier run's checkpoints, out of resume's way
            aside = self.ckpt_dir.with_name(f"checkpoints.previous-{time.strftime('%Y%m%d-%H%M%S')}")
            self.ckpt_dir.rename(aside)
            log(WARNING, "fresh run: earlier checkpoints moved to %s", aside)
        n_features, sizes = self.handshake()
        arrays, whole = self.initial_arrays(n_features)
        shared = int(sum(a.nbytes for a in arrays.values()))
        meta = {"run_id": self.run_id, "strategy": str(self.fed.strategy), "n_features": n_features, "site_sizes": sizes,
                "payload_bytes": shared, "whole_model_bytes": whole, "share_all": bool(self.fed.share_all),
                **model_meta(self.cfg, n_features, self.features_sha256)}
        log(INFO, "payload: %d arrays, %.1f kB per upload (whole model %.1f kB)", len(arrays),
            shared / 1e3, whole / 1e3)
        return 1, arrays, History(), meta

    # --- rounds -------------------------------------------------------------------------------------
    def train_round(self, rnd: int, arrays: dict[str, np.ndarray], record: dict[str, Any]) -> dict[str, np.ndarray]:
        phase = record["phase"]
        config = self.round_config({PHASE: phase, ROUND: rnd})
        spec = protocol.spec_of(arrays)
        msgs = self.messages(self.strategy.configure_train, rnd, arrays, config)
        replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
        got = self.screened(msgs, replies, spec)
        self.spent |= {int(m.metadata.src_node_id) for m in replies
                       if m.has_error() and m.error.code == protocol.ERROR_BUDGET_SPENT}
        updates = self.bounded(rnd, arrays, got, record)
        weights = self.weights(rnd, got.accepted, training.phase_split(phase))
        pulled = robust.bound_pulls(updates, arrays, weights, self.robust)
        updates = self.log_clipped(rnd, pulled, "pull (weight x change)", record)
        for r in got.rejected:
            log(WARNING, "round %d: REJECTED update from %s (node %s): %s", rnd, r["site"], r["node"], r["reason"])
        for f in got.failed:
            log(WARNING, "round %d: no update from %s: %s", rnd, f["site"], f["reason"])
        for w in got.withheld:
            log(INFO, "round %d: %s withheld its update: %s", rnd, w["site"], w["reason"])
        record.update(rejected=got.rejected, failed=got.failed, withheld=got.withheld,
                      site_train={self.name_of(m.metadata.src_node_id): metrics_of(m) for m in got.accepted},
                      upload_bytes={self.name_of(m.metadata.src_node_id): protocol.record_nbytes(_arrays_of(m))
                                    for m in got.accepted},
                      weights={self.name_of(n): w for n, w in weights.items()})
        need = max(int(self.fed.min_train_replies), int(min_robust_replies(self.strategy)))
        if len(got.accepted) < need:
            log(WARNING, "round %d: %d valid updates < %d needed (federation.min_train_replies, strategy %s); "
                "global model unchanged", rnd, len(got.accepted), need, self.fed.strategy)
            return arrays
        before = strategy_state(self.strategy)
        (agg, train_metrics), problem = _guarded(
            lambda: self.strategy.aggregate_train(rnd, for_strategy(got.accepted, weights, updates)), (None, None))
        record["train"] = dict(train_metrics or {})
        if agg is not None:
            new = protocol.unpack(agg, spec, cast=True)
            problem = robust.aggregate_problem(arrays, new, self.robust.max_global_change)
        if problem:
            log(WARNING, "round %d: aggregate REFUSED (%s): global model unchanged, no checkpoint", rnd, problem)
            record["aggregate_rejected"] = problem
            restore_strategy_state(self.strategy, before)  # FedAdam's moments must not keep the refused step
            return arrays
        return arrays if agg is None else new

    def screened(self, msgs: list[Message], replies: list[Message], spec: protocol.Spec | None,
                 handshake: bool = False) -> Screened:
        """Screen replies; failures and rejections carry the site's handshake name. Every site that was
        asked but never answered itself is a failure too (``silent``): dropped or timed out, or a node the
        SuperLink answered for (Flower's NODE_UNAVAILABLE, sent from the SuperLink's own node id: it is
        named here by the node it was meant for)."""
        asked = {int(m.metadata.dst_node_id) for m in msgs}
        gone = [m for m in replies if m.has_error() and m.error.code == ErrorCode.NODE_UNAVAILABLE]
        own = [m for m in replies if all(m is not g for g in gone)]  # the replies the nodes sent themselves
        got = screen(own, spec, self.identities, handshake)
        answered = {int(m.metadata.src_node_id) for m in own}
        unavailable = {_meant_for(m, msgs): site_text(m.error.reason) for m in gone}
        got.silent = asked - answered
        got.failed += [{"node": str(n), "site": self.name_of(n),
                        "reason": unavailable.get(n, f"no reply within {self.timeout:g} s")} for n in sorted(got.silent)]
        return got

    def bounded(self, rnd: int, arrays: dict[str, np.ndarray], got: Screened,
                record: dict[str, Any]) -> dict[int, dict[str, np.ndarray]]:
        """Apply server/robust.py's bounds to the accepted updates before the strategy sees them: reject or clip
        each update's change. Returns node -> the update to aggregate; rejected ones leave ``got.accepted``."""
        bounded = robust.bound_updates(got.updates, arrays, self.robust)
        for r in bounded.rejected:
            got.rejected.append({"node": str(r["site"]), "site": self.name_of(r["site"]), "reason": r["reason"]})
        record["clipped"] = []
        got.accepted = [m for m in got.accepted if int(m.metadata.src_node_id) in bounded.updates]
        return self.log_clipped(rnd, bounded, "change", record)

    def log_clipped(self, rnd: int, bounded: robust.Bounded, what: str, record: dict[str, Any]) -> dict[int, dict[str, np.ndarray]]:
        """Log and record the updates ``bounded`` clipped (by their ``what``); return its updates."""
        for c in bounded.clipped:
            node = c["site"]
            log(WARNING, "round %d: CLIPPED update from %s: %s %.3g x the round's median (federation.robust."
                "max_update_norm=%g)", rnd, self.name_of(node), what, c["ratio"], c["bound"])
            record["clipped"].append({"node": str(node), "site": self.name_of(node), "ratio": c["ratio"], "of": what})
        return bounded.updates

    def weights(self, rnd: int, replies: list[Message], split: str) -> dict[int, float]:
        """node -> the aggregation weight of its train or evaluate reply on ``split``: its ``num-examples``
        capped by robust.aggregation_weights (the split's size reported at the handshake, and
        federation.robust.max_weight_ratio x the round's median weight), so that no site sets the aggregate
        by a claim of its own."""
        claimed = {int(m.metadata.src_node_id): float(next(iter(m.content.metric_records.values()))[NUM_EXAMPLES])
                   for m in replies}
        caps = {n: self.site_sizes.get(self.name_of(n), {}).get(f"n_{split}") for n in claimed}
        weights = robust.aggregation_weights(claimed, caps, self.robust.weights, self.robust.max_weight_ratio)
        for n, w in weights.items():
            if w != claimed[n]:
                log(INFO, "round %d: %s claimed %s=%g on %s, weighted %g (federation.robust.weights=%s, "
                    "max_weight_ratio=%s)", rnd, self.name_of(n), NUM_EXAMPLES, claimed[n], split, w,
                    self.robust.weights, self.robust.max_weight_ratio)
        return weights

    def too_few_can_train(self, rnd: int) -> str | None:
        """Why the run must end after ``rnd``: fewer sites are admitted than federation.min_available_nodes
        (a site refused mid-run never comes back in it, and the strategy would wait for it forever), or fewer
        than federation.min_train_replies can still train (a spent privacy or compute budget never comes back
        in a run), so every further round would train nothing."""
        admitted = self.identities.admitted()
        if len(admitted) < int(self.fed.min_available_nodes):
            return (f"run ended after round {rnd} of {self.total_rounds}: {len(admitted)} site(s) admitted, fewer "
                    f"than federation.min_available_nodes={self.fed.min_available_nodes} (refused: "
                    f"{', '.join(sorted(self.name_of(n) for n in self.identities.refused))})")
        able = ({int(n) for n in self.grid.get_node_ids()} & admitted) - self.spent
        need = int(self.fed.min_train_replies)
        if not self.spent or len(able) >= need:
            return None
        return (f"run ended after round {rnd} of {self.total_rounds}: {len(able)} site(s) can still train, fewer "
                f"than federation.min_train_replies={need} (budget spent: "
                f"{', '.join(sorted(self.name_of(n) for n in self.spent))})")

    def evaluate(self, rnd: int, arrays: dict[str, np.ndarray], split: str) -> tuple[dict, dict, list[dict]]:
        """(aggregate metrics, each site's metrics, the sites that did not evaluate and why)."""
        config = self.round_config({SPLIT: split, ROUND: rnd})
        msgs = self.messages(self.strategy.configure_evaluate, rnd, arrays, config)
        got = self.screened(msgs, list(self.grid.send_and_receive(msgs, timeout=self.timeout)), None)
        for f in got.failed + got.rejected:
            log(WARNING, "round %d: no evaluation from %s: %s", rnd, f["site"], f["reason"])
        per_site = {self.name_of(m.metadata.src_node_id): metrics_of(m) for m in got.accepted}
        per_site.update({w["site"]: {"withheld": w["reason"]} for w in got.withheld})  # recorded, not failed
        if not got.accepted:
            return {}, per_site, got.failed + got.rejected
        weights = self.weights(rnd, got.accepted, split)
        agg, problem = _guarded(lambda: self.strategy.aggregate_evaluate(rnd, for_strategy(got.accepted, weights)), None)
        if problem:
            log(WARNING, "round %d: no aggregate evaluation (%s); each site's own metrics are kept", rnd, problem)
        return dict(agg or {}), per_site, got.failed + got.rejected

    def messages(self, configure: Callable[..., Any], rnd: int, arrays: dict[str, np.ndarray],
                 config: ConfigRecord) -> list[Message]:
        """The strategy's train or evaluate messages of this round, carrying ``arrays`` packed with their
        layout, for the admitted sites only: a node refused (by identity or at the handshake) or never
        identified gets neither the global model nor the run id, and takes no sample slot. None when fewer
        sites are admitted than the strategy waits for: a refused site never comes back in this run, and
        the strategy would wait for it forever (too_few_can_train then ends the run)."""
        admitted = self.identities.admitted()
        if len(admitted) < int(self.fed.min_available_nodes):
            return []
        record, layout = protocol.pack(arrays)
        msgs = list(configure(rnd, record, config, AdmittedGrid(self.grid, admitted)))
        for msg in msgs:
            msg.content[protocol.LAYOUT] = layout
        return msgs

    def run(self) -> History:
        first, arrays, history, meta = self.start_state()
        self.site_sizes = dict(meta.get("site_sizes") or {})
        self.identities.sources.update({site: source for site, source in (meta.get("identity") or {}).items()
                                        if site not in self.refused_at_handshake})  # resumed: the sites admitted before
        meta["identity"] = self.identities.sources  # site -> what named it ("key" | "declared"), checkpointed
        meta["refused_at_handshake"] = self.refused_at_handshake  # site -> why this run left it out
        t0 = time.time()
        stopped = None
        for rnd in range(first, self.total_rounds + 1):
            phase = phase_of(rnd, self.cfg)
            record: dict[str, Any] = {"round": rnd, "phase": phase}
            arrays = self.train_round(rnd, arrays, record)
            record["evaluate"], record["site_eval"], record["eval_failed"] = self.evaluate(
                rnd, arrays, str(self.fed.eval_split))
            record["seconds"] = round(time.time() - t0, 2)
            record["identity"] = dict(self.identities.sources)
            stopped = self.too_few_can_train(rnd) if rnd < self.total_rounds else None
            if stopped:
                record["stopped"] = stopped
            history.add(record)
            history.save(self.dir, plot=False)  # JSON/CSV every round; the PNG once at the end
            if "aggregate_rejected" not in record:  # a refused aggregate never becomes a checkpoint
                ckpt.save_checkpoint(self.ckpt_dir, ckpt.Checkpoint(
                    rnd, phase, arrays, strategy_state(self.strategy), {**meta, "history": history.records}),
                    keep=int(self.fed.keep_checkpoints))
            eps = {s: m.get("epsilon") for s, m in record.get("site_train", {}).items()}
            log(INFO, "[round %d/%d %s] train %s | eval %s | epsilon %s | %d rejected, %d clipped, %d failed",
                rnd, self.total_rounds, phase, _short(record.get("train")), _short(record["evaluate"]),
                _short(eps), len(record["rejected"]), len(record.get("clipped", [])), len(record["failed"]))
            if stopped:
                log(WARNING, "%s", stopped)
                break
        history.save(self.dir)
        if not self.fed.final_eval_split:
            return history
        final_agg, final_sites, final_failed = self.evaluate(self.total_rounds, arrays, str(self.fed.final_eval_split))
        final = {"round": self.total_rounds, "split": str(self.fed.final_eval_split),
                 "aggregate": final_agg, "sites": final_sites, "failed": final_failed,
                 **({"stopped": stopped} if stopped else {}), **{k: v for k, v in meta.items() if k != "history"}}
        write_json(self.dir / "final_metrics.json", final)
        log(INFO, "final %s metrics per site: %s", self.fed.final_eval_split, {s: _short(m) for s, m in final_sites.items()})
        return history


def _meant_for(reply: Message, msgs: list[Message]) -> int:
    """The node a reply answers for: its sender where that is a node asked, else (the SuperLink wrote it,
    from its own node id) the node of the message it replies to, found by id (set when it was sent)."""
    src = int(reply.metadata.src_node_id)
    if src in {int(m.metadata.dst_node_id) for m in msgs}:
        return src
    return next((int(m.metadata.dst_node_id) for m in msgs
                 if m.metadata.message_id and m.metadata.message_id == reply.metadata.reply_to_message_id), src)


def _arrays_of(msg: Message) -> ArrayRecord:
    return next(iter(msg.content.array_records.values()))


class AdmittedGrid:
    """``grid`` as the strategy's ``configure_*`` sees it: its connected nodes that are ``admitted``."""

    def __init__(self, grid: Grid, admitted: set[int]) -> None:
        self._grid, self._admitted = grid, admitted

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if int(n) in self._admitted]


def _guarded(aggregate: Callable[[], Any], failed: Any) -> tuple[Any, str | None]:
    """(the strategy's aggregate, None), or (``failed``, why) where Flower's strategy raised on what the
    replies hold (screening should have caught it): that round's aggregate is refused, the run goes on."""
    try:
        return aggregate(), None
    except Exception as exc:  # noqa: BLE001 - any exception: one site's reply must not end the run
        return failed, site_text(f"the strategy's aggregation failed: {type(exc).__name__}: {exc}")


def _short(metrics: dict | None) -> str:
    if not metrics:
        return "-"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, (int, float)) and v is not None else f"{k}={v}"
                     for k, v in sorted(metrics.items()))


def make_server_app(extra_overrides: Sequence[str] = ()) -> ServerApp:
    """A ServerApp composing the config from the run config plus ``extra_overrides`` (simulation)."""
    server_app = ServerApp()
    extra = tuple(extra_overrides)

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        cfg = compose(run_config_overrides(context, extra))
        polling = ShortPollGrid(grid, float(cfg.federation.reply_poll_s))  # checks reply_poll_s (ConfigError)
        cap_pull_backoff(polling.interval)  # a reply is visible before all of its objects
        Federation(polling, cfg, run_id=context.run_id).run()

    return server_app


app = make_server_app()
