"""Site authentication keys, shared by the hospital (``osteo-keygen``) and the coordinator (``osteo-provision``,
the ServerApp's identity check).

A hospital generates its own key pair; the private half never leaves its folder, the coordinator registers
the public half only. Flower's SuperNode authentication takes an EC key on a NIST curve in OpenSSH format
(P-384 here). Fingerprints use OpenSSH's ``SHA256:<base64>`` form so that ``ssh-keygen -lf X_key.pub`` at
either end shows the same string: the two sides compare it out of band (phone, letter) before registering.
"""
from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from osteo_model.atomic import atomic_file
from osteo_model.errors import ConfigError
from osteofl.protocol import site_key_paths

CURVE = ec.SECP384R1()
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what Flower accepts for SuperNode authentication


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """OpenSSH's SHA-256 fingerprint of a public key (``ssh-keygen -lf`` prints the same)."""
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def fingerprint_of_pem(data: bytes) -> str | None:
    """Fingerprint of a PEM public key as Flower stores it for a registered node; None if it is not an EC
    key (a simulated node's random bytes, an unauthenticated node)."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return fingerprint(key) if isinstance(key, ec.EllipticCurvePublicKey) else None


def load_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """A site's OpenSSH public key file, checked: readable, public (never a private key), EC on a NIST curve."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, f"public key unreadable ({exc.strerror})") from exc
    if b"PRIVATE KEY" in data:
        raise ConfigError(path, "this is a PRIVATE key: send only the .pub file, and generate a new key pair "
                                "at the site (osteo-keygen) since this one has left it")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(path, "not an OpenSSH public key (expected one line 'ecdsa-sha2-nistp384 AAAA... name'; "
                                "osteo-keygen writes it)") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise ConfigError(path, "Flower's node authentication needs an EC key on a NIST curve (osteo-keygen: P-384)")
    return key


def public_line(key: ec.EllipticCurvePublicKey, site: str) -> bytes:
    """The key as one OpenSSH line with the site name as its comment."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {site}\n".encode()


def make_site_key(folder: str | Path, site: str) -> tuple[Path, Path]:
    """The site's key pair in ``folder`` (created 0700): private key 0600, public key beside it. Kept if
    present, so re-running never rotates a registered key by accident."""
    private, public = site_key_paths(folder, site)
    if private.exists() and public.exists():
        return private, public
    if private.exists() or public.exists():
        raise ConfigError(private.parent, f"only half of site {site}'s key pair is here: remove "
                                          f"{private.name}* and generate again")
    private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(CURVE)
    with atomic_file(private, private=True) as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()))
    with atomic_file(public) as fh:
        fh.write(public_line(key.public_key(), site))
    return private, public
