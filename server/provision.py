"""Provisioning a federation at the coordinating site: a CA, the SuperLink's TLS certificate, and the
PUBLIC authentication keys the hospitals sent.

Layout of the PKI folder (``paths.pki``):
- ``ca.key`` / ``ca.pem``          the federation's certificate authority (ca.key stays with the coordinator)
- ``server.key`` / ``server.pem``  the SuperLink's certificate, SAN = every name/IP sites dial
- ``sites/<site>/<site>_key.pub``  the site's public key (OpenSSH, EC P-384), registered with the SuperLink.
  The private half is generated at the hospital (``osteo-keygen``) and never reaches this folder; the
  ServerApp names each node after the site whose key this is (``osteofl.server.identity``).
- ``registered.json``              which sites' keys this SuperLink database already knows

Every step is idempotent: existing files are kept (re-running never rotates a key by accident; a site
that sends a different key must have its old one removed first), and a key the SuperLink already holds
counts as registered.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import subprocess
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from osteo_model.atomic import atomic_file
from osteo_model.errors import ConfigError
from osteofl import keys
from osteofl.protocol import registered_key_path

CERT_DAYS = 825  # TLS server certificates: the CA/Browser Forum's former maximum; renew by re-provisioning
CURVE = keys.CURVE  # the CA and the server certificate use the site keys' curve (P-384)


def _write_private(path: Path, data: bytes) -> None:
    """Create a private file (0600) atomically."""
    with atomic_file(path, private=True) as fh:
        fh.write(data)


def _write_public(path: Path, data: bytes) -> None:
    with atomic_file(path) as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OsteoFL federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_ca(pki: Path) -> tuple[Path, Path]:
    """``ca.key``/``ca.pem`` (kept if present)."""
    pki.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = pki / "ca.key", pki / "ca.pem"
    if key_path.exists() and cert_path.exists():
        return key_path, cert_path
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("OsteoFL CA")).issuer_name(_name("OsteoFL CA"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA384())
    )
    _write_private(key_path, _pem_key(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def server_sans(pki: Path) -> list[str]:
    """The SAN entries of the existing server certificate (empty if there is none)."""
    path = pki / "server.pem"
    if not path.exists():
        return []
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def make_server_cert(pki: Path, names: Iterable[str]) -> tuple[Path, Path]:
    """``server.key``/``server.pem`` signed by the CA, SAN = ``names``; re-issued only if names change."""
    names = list(dict.fromkeys(str(n) for n in names))
    if not names:
        raise ConfigError(None, "federation.superlink.san is empty: name the address sites dial")
    key_path, cert_path = pki / "server.key", pki / "server.pem"
    if key_path.exists() and cert_path.exists() and set(server_sans(pki)) == set(names):
        return key_path, cert_path
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key = ec.generate_private_key(CURVE)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())  # type: ignore[arg-type]
    )
    _write_private(key_path, _pem_key(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def register_public_key(pki: str | Path, site: str, public_key: str | Path) -> Path:
    """Copy the public key a hospital sent to ``sites/<site>/<site>_key.pub`` after checking it (a public EC
    key on a NIST curve, not a private key, not already another site's). The same key again is a no-op; a
    different key for a registered site is refused: rotating a site's identity is a deliberate act."""
    key = keys.load_public_key(public_key)
    fp = keys.fingerprint(key)
    target = registered_key_path(pki, site)
    owners = {s: f for s, f in public_keys(pki).items() if f == fp and s != site}
    if owners:
        raise ConfigError(public_key, f"this key is already registered for site {sorted(owners)[0]}: "
                                      "every site needs its own key (osteo-keygen at that site)")
    if target.exists():
        if keys.fingerprint(keys.load_public_key(target)) == fp:
            return target
        raise ConfigError(target, f"site {site} already has a different registered key; remove this file "
                                  "first to rotate it (and re-register with the SuperLink)")
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_public(target, keys.public_line(key, site))
    return target


def public_keys(pki: str | Path) -> dict[str, str]:
    """site -> fingerprint of every registered public key under ``pki/sites``."""
    out = {}
    for path in sorted((Path(pki) / "sites").glob("*/*_key.pub")):
        site = path.parent.name
        if path == registered_key_path(pki, site):
            out[site] = keys.fingerprint(keys.load_public_key(path))
    return out


def provision(pki: str | Path, sites: Iterable[str], san: Iterable[str]) -> dict[str, Path]:
    """CA and server certificate; returns the paths a deployment needs, with the public key of every site
    in ``sites`` that has sent one (``<site>_pub``). Never creates a site key."""
    pki = Path(pki)
    _, ca = make_ca(pki)
    server_key, server_cert = make_server_cert(pki, san)
    paths = {"ca": ca, "server_key": server_key, "server_cert": server_cert}
    for site in sites:
        if registered_key_path(pki, site).exists():
            paths[f"{site}_pub"] = registered_key_path(pki, site)
    return paths


# --- registration with a running SuperLink ----------------------------------------------------------

def _registry(pki: Path) -> dict[str, dict[str, str]]:
    path = pki / "registered.json"
    return json.loads(path.read_text()) if path.exists() else {}


def register_sites(pki: str | Path, sites: Iterable[str], connection: str, env: dict[str, str],
                   database: str) -> dict[str, str]:
    """``flwr supernode register`` every site's public key with the SuperLink behind ``connection``.

    Idempotent per SuperLink database file: a site already recorded for ``database`` is skipped, and a
    key the SuperLink reports as already in use counts as registered (an in-memory SuperLink,
    ``database=""``, forgets keys on restart, so its sites are always registered again). Returns site -> node id ("" if known
    only as already registered).
    """
    pki = Path(pki)
    registry = _registry(pki)
    known = registry.setdefault(database, {})
    out: dict[str, str] = {}
    for site in sites:
        pub = registered_key_path(pki, site)
        if not pub.exists():
            raise ConfigError(pub, f"no public key for site {site}: the hospital runs `osteo-keygen --site "
                                   f"{site}` and sends {pub.name}; register it with `osteo-provision "
                                   f"--site-key {site}=<file>`")
        fingerprint = keys.fingerprint(keys.load_public_key(pub))
        entry = known.get(site)
        if database and isinstance(entry, dict) and entry.get("key") == fingerprint:
            out[site] = str(entry.get("node_id", ""))
            continue
        proc = subprocess.run(["flwr", "supernode", "register", str(pub), connection, "--name", site,
                               "--format", "json"], capture_output=True, text=True, env=env, timeout=120)
        answer = _json_answer(proc.stdout)
        if answer.get("success"):
            node_id = str(answer.get("node-id", ""))
        elif "already in use" in (str(answer.get("error-message", "")) + proc.stderr).lower():
            node_id = ""
        else:
            text = str(answer.get("error-message") or proc.stderr or proc.stdout).strip()
            raise ConfigError(pub, f"registering site {site} failed: {text[-300:]}")
        known[site] = {"key": fingerprint, "node_id": node_id}
        out[site] = node_id
    _write_public(pki / "registered.json", json.dumps(registry, indent=1).encode())
    return out


def _json_answer(stdout: str) -> dict:
    """The JSON object `flwr ... --format json` prints (after any banner lines); {} if none."""
    start = stdout.find("{")
    try:
        return json.loads(stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}
