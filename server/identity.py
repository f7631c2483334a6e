"""Which site a node is: bound to the key it authenticated with, never taken from what its reply says.

``federation.identity``:
- ``key`` (deployments, the default): Flower's own node registry, which the ServerApp reads through
  ``Grid.get_nodes()`` (``NodeInfo.public_key``: the key the SuperNode authenticated with; ``NodeInfo.name``:
  the ``--name`` it was registered under), is matched against the PUBLIC keys the coordinator registered
  (``<pki>/sites/<site>/<site>_key.pub``, ``osteo-provision``). The node is the site whose key it holds. A
  node whose key the coordinator never registered is refused even if Flower knows it (the SuperLink's
  Control API is unauthenticated in open-source Flower: anyone reaching it can register a key under any
  name), and so is a node whose Flower name disagrees with its key.
- ``declared`` (Flower simulation, ``flower-server --insecure``, the in-process test grid): there is no
  key, so a node is the name its first reply declares, first come first named; a name another node already
  holds, or that two new nodes claim at once, is refused for both claimants. (Simulation nodes get random
  ids and Flower keeps their partition numbers to itself, so the node order cannot be used.)
In both modes a reply that declares another name than its node's identity is refused (logged, never
aggregated, never in the history), and every history entry records which of the two named the site.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterable

from flwr.app import Message

from osteo_model.errors import ConfigError
from osteofl import keys
from osteofl.server.provision import public_keys

KEY, DECLARED = "key", "declared"
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""What a declared name must be (simulation, --insecure): a registered key names a site the coordinator chose,
a declaration is the node's own word, so no control characters, separators or 1,000-character names."""


def declared_name(msg: Message) -> str | None:
    """The site name a reply declares (a ConfigRecord's "name"); None for an error reply or none given."""
    if msg.has_error():
        return None
    for record in msg.content.config_records.values():
        if "name" in record:
            return str(record["name"])
    return None


class Identities:
    """node id -> site name for one run, established at a node's first reply (the handshake) and kept."""

    def __init__(self, grid, mode: str, pki: str | Path) -> None:
        if mode not in (KEY, DECLARED):
            raise ConfigError(None, f"federation.identity={mode!r}: expected {KEY!r} or {DECLARED!r}")
        self.grid, self.mode, self.pki = grid, mode, Path(pki)
        self.identity: dict[int, str] = {}  # every identified node, refused ones too (to name them in logs)
        self.sources: dict[str, str] = {}   # admitted site -> KEY | DECLARED (what named it)
        self.refused: dict[int, str] = {}   # node -> why none of its replies count
        self.by_key = self._key_owners() if mode == KEY else {}
        if mode == KEY and not self.by_key:
            raise ConfigError(self.pki / "sites", "federation.identity=key but no site has a registered "
                                                  "public key here (osteo-provision --site-key SITE=FILE)")

    def _key_owners(self) -> dict[str, str]:
        """fingerprint -> site of the coordinator's registered public keys; one key naming two sites is an error."""
        owners: dict[str, str] = {}
        for site, fp in public_keys(self.pki).items():
            if fp in owners:
                raise ConfigError(self.pki / "sites", f"sites {owners[fp]} and {site} have the same public key: "
                                                      "remove the wrong copy; every site makes its own (osteo-keygen)")
            owners[fp] = site
        return owners

    def name_of(self, node_id: int) -> str:
        """The node's site, or ``node-<id>`` for a node not (yet) identified or refused before naming."""
        return self.identity.get(int(node_id), f"node-{node_id}")

    def admitted(self) -> set[int]:
        """The nodes that take part: identified, and not refused since (by identity or at the handshake)."""
        return set(self.identity) - set(self.refused)

    def refuse(self, node: int, reason: str) -> None:
        """Refuse an identified node for the rest of the run (its site no longer counts as admitted)."""
        self.refused[node] = reason
        self.sources.pop(self.identity.get(node, ""), None)

    def check(self, replies: Iterable[Message]) -> dict[int, str]:
        """Identify the repliers not yet known; returns node -> reason for every reply that must not count."""
        replies = list(replies)
        new = {m.metadata.src_node_id for m in replies} - set(self.identity) - set(self.refused)
        if self.mode == KEY:
            self._from_keys(new)
        else:
            self._from_declarations([m for m in replies if m.metadata.src_node_id in new])
        out = {}
        for msg in replies:
            node, said = msg.metadata.src_node_id, declared_name(msg)
            if node in self.refused:
                out[node] = self.refused[node]
            elif said is not None and node in self.identity and said != self.identity[node]:
                site = self.identity[node]
                self.refuse(node, f"declares site {said!r} but is {site!r} "
                                  f"({'by its registered key' if self.mode == KEY else 'since its first reply'}); "
                                  "refused for this run")
                out[node] = self.refused[node]
        return out

    def _admit(self, node: int, site: str, source: str) -> None:
        self.identity[node] = site
        self.sources[site] = source

    def _from_keys(self, nodes: set[int]) -> None:
        if not nodes:
            return
        infos = {int(i.node_id): i for i in self.grid.get_nodes() if int(i.node_id) in nodes}
        self.by_key = self._key_owners()  # a site registered mid-run counts too
        for node in sorted(nodes):
            info = infos.get(node)
            fp = keys.fingerprint_of_pem(bytes(info.public_key)) if info is not None else None
            site = self.by_key.get(fp) if fp else None
            flower_name = str(info.name) if info is not None else ""
            if site is None:
                self.refused[node] = (f"its key ({fp or 'none'}) is not a site key the coordinator registered"
                                      + (f" (Flower name {flower_name!r})" if flower_name else ""))
            elif flower_name and flower_name != site:
                self.refused[node] = f"registered with Flower as {flower_name!r} but holds site {site!r}'s key"
            elif site in self.identity.values():
                self.refused[node] = f"site {site!r} is already connected as another node"
            else:
                self._admit(node, site, KEY)

    def _from_declarations(self, replies: list[Message]) -> None:
        claims = {m.metadata.src_node_id: declared_name(m) for m in replies}
        counts = Counter(name for name in claims.values() if name is not None)
        held = set(self.identity.values())
        for node, name in sorted(claims.items()):
            if name is None:
                continue  # an error reply names nobody: identified by its next good reply
            if not SITE_NAME.fullmatch(name):
                self.refused[node] = (f"declares {name[:40]!r}{'...' if len(name) > 40 else ''}, not a site name "
                                      "(letters, digits, '_', '.', '-'; at most 64)")
            elif name in held:
                self.refused[node] = f"declares site {name!r}, which another node already is"
            elif counts[name] > 1:
                self.refused[node] = f"declares site {name!r}, as {counts[name]} nodes do at once: none is admitted"
            else:
                self._admit(node, name, DECLARED)
