"""The deployment recipe that exposes only the Fleet API to hospitals (``flower-server --proxy-config``).

Flower 1.42's SuperLink has no option to split its APIs: Fleet, Control (``flwr ls/stop``, not
authenticated in open-source Flower), Runtime, ``/docs`` and ``openapi.json`` share one port. So the
SuperLink stays on loopback and ``deploy/nginx.conf``, rendered here for the configured ports and
certificates, is the hospitals' only door: TLS with the federation's server certificate, ``/v1/fleet/``
passed on (re-encrypted, the SuperLink's certificate verified), everything else 404.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path

from omegaconf import DictConfig

from osteo_model.errors import ConfigError

TEMPLATE = Path(__file__).parent / "deploy" / "nginx.conf"
MAX_BODY = "512m"  # a site's update and the app bundle travel in one request each


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def render(cfg: DictConfig, listen: str, prefix: Path) -> str:
    """nginx.conf for a proxy on ``listen`` (``host:port``) in front of the loopback SuperLink."""
    sl, pki = cfg.federation.superlink, Path(cfg.paths.pki).resolve()
    if not _loopback(str(sl.host)):
        raise ConfigError(None, f"federation.superlink.host={sl.host}: behind the proxy the SuperLink must stay on "
                                "loopback (127.0.0.1), or Control and Runtime are exposed anyway")
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(None, f"--proxy-config {listen!r}: expected HOST:PORT, e.g. 0.0.0.0:9443")
    if int(port) == int(sl.port) and _loopback(host):
        raise ConfigError(None, f"--proxy-config {listen}: the SuperLink already uses port {sl.port} there")
    return TEMPLATE.read_text().format(
        prefix=prefix.resolve(), listen=listen, superlink=f"{sl.host}:{sl.port}", superlink_host=sl.host,
        cert=pki / "server.pem", key=pki / "server.key", ca=pki / "ca.pem", max_body=MAX_BODY)


def write(cfg: DictConfig, listen: str, prefix: Path) -> Path:
    """Render into ``prefix/nginx.conf`` (with the temp folders nginx wants) and return its path."""
    text = render(cfg, listen, prefix)
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path
