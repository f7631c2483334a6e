"""Provisioning (CA, server certificate with SANs, site keys) and the commands' Flower invocations."""
from __future__ import annotations

import json
import shlex
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from osteo_model.config import compose
from osteofl.client import cli as client_cli
from osteofl.runtime import flower_env
from osteofl.server import cli as server_cli
from osteofl.server import provision


def test_provision_creates_ca_server_cert_and_p384_site_keys(tmp_path: Path) -> None:
    paths = provision.provision(tmp_path, ["site_a", "site_b"], ["127.0.0.1", "fl.example.org"])
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    assert server.issuer == ca.subject
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes,
                           ec.ECDSA(server.signature_hash_algorithm))  # signed by our CA
    assert set(provision.server_sans(tmp_path)) == {"127.0.0.1", "fl.example.org"}
    for site in ("site_a", "site_b"):
        private = serialization.load_ssh_private_key(paths[f"{site}_key"].read_bytes(), password=None)
        public = serialization.load_ssh_public_key(paths[f"{site}_pub"].read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert public.public_numbers() == private.public_key().public_numbers()
        assert stat.S_IMODE(paths[f"{site}_key"].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600


def test_provision_is_idempotent_and_reissues_only_on_new_names(tmp_path: Path) -> None:
    first = provision.provision(tmp_path, ["site_a"], ["127.0.0.1"])
    snapshot = {k: p.read_bytes() for k, p in first.items()}
    again = provision.provision(tmp_path, ["site_a", "site_b"], ["127.0.0.1"])
    assert all(again[k].read_bytes() == v for k, v in snapshot.items())  # nothing rotated by accident
    assert again["site_b_key"].exists()
    provision.provision(tmp_path, ["site_a"], ["127.0.0.1", "localhost"])
    assert first["server_cert"].read_bytes() != snapshot["server_cert"]
    assert first["ca"].read_bytes() == snapshot["ca"] and first["site_a_key"].read_bytes() == snapshot["site_a_key"]


def test_register_is_idempotent_per_database(tmp_path: Path, monkeypatch) -> None:
    provision.provision(tmp_path, ["site_a"], ["127.0.0.1"])
    calls: list[list[str]] = []

    class Done:
        def __init__(self, stdout: str) -> None:
            self.returncode, self.stdout, self.stderr = 0, stdout, ""

    answers = iter(['Using SuperLink\n{"success": true, "node-id": 42}',
                    '{"success": false, "error-message": "[code: 23] Public key already in use."}'])
    monkeypatch.setattr(provision.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done(next(answers)))
    assert provision.register_sites(tmp_path, ["site_a"], "osteofl", {}, "/db1") == {"site_a": "42"}
    assert provision.register_sites(tmp_path, ["site_a"], "osteofl", {}, "/db1") == {"site_a": "42"}
    assert len(calls) == 1  # known to this database: not asked again
    assert provision.register_sites(tmp_path, ["site_a"], "osteofl", {}, "/db2") == {"site_a": ""}
    assert json.loads((tmp_path / "registered.json").read_text())["/db2"]["site_a"]["node_id"] == ""


def test_register_failure_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    provision.provision(tmp_path, ["site_a"], ["127.0.0.1"])

    class Failed:
        returncode, stdout, stderr = 1, "", "connection refused"

    monkeypatch.setattr(provision.subprocess, "run", lambda cmd, **kw: Failed())
    with pytest.raises(provision.ConfigError, match="registering site site_a failed: connection refused"):
        provision.register_sites(tmp_path, ["site_a"], "osteofl", {}, "/db")


def test_superlink_is_tls_authenticated_and_loopback_by_default(tmp_path: Path) -> None:
    cfg = compose([f"paths.root={tmp_path}"])
    cmd = server_cli.superlink_command(cfg, insecure=False, database=tmp_path / "db")
    assert "--enable-supernode-auth" in cmd and "--ssl-certfile" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    insecure = server_cli.superlink_command(cfg, insecure=True, database=tmp_path / "db")
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    server_cli.write_connection(tmp_path / "home", cfg, insecure=False)
    text = (tmp_path / "home" / "config.toml").read_text()
    assert "root-certificates" in text and "insecure" not in text


def test_run_command_carries_overrides_and_resume() -> None:
    cmd = server_cli.run_command(["model.channels=[4,8]", "paths.root=/x y"], resume=True)
    run_config = cmd[cmd.index("--run-config") + 1]
    assert "resume=true" in run_config
    import tomllib

    parsed = tomllib.loads(run_config.replace(" resume=", "\nresume="))
    assert shlex.split(parsed["overrides"]) == ["model.channels=[4,8]", "paths.root=/x y"]


def test_client_supernode_command_uses_site_key_and_root_cert(tmp_path: Path) -> None:
    cfg = compose([f"paths.root={tmp_path}", "site.name=site_a"])
    args = client_cli.build_parser().parse_args(["--site", "site_a"])
    with pytest.raises(client_cli.OsteoError, match="root certificate missing"):
        client_cli.supernode_command(args, cfg)
    provision.provision(cfg.paths.pki, ["site_a"], ["127.0.0.1"])
    cmd = client_cli.supernode_command(args, cfg)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1].endswith("sites/site_a/site_a_key")
    assert cmd[cmd.index("--root-certificates") + 1].endswith("ca.pem") and "--insecure" not in cmd
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"  # the SuperNode's own API stays on loopback
    assert "site='site_a'" in cmd[cmd.index("--node-config") + 1]


def test_client_cli_refuses_unprepared_site_in_one_line(tmp_path: Path, capsys) -> None:
    assert client_cli.main(["--site", "nowhere", f"paths.root={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere" in err and "\n" not in err


def test_flower_env_is_private_and_quiet(tmp_path: Path) -> None:
    env = flower_env(tmp_path)
    assert env["FLWR_HOME"] == str(tmp_path) and env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert flower_env(tmp_path, telemetry=True)["FLWR_TELEMETRY_ENABLED"] == "1"
