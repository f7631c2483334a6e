"""Provisioning (CA, server certificate with SANs, site keys) and the commands' Flower invocations."""
from __future__ import annotations

import json
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.config import parse_config_args

from osteo_model.config import compose
from osteo_model.errors import ConfigError
from osteofl import keys
from osteofl.client import cli as client_cli
from osteofl.client import keygen_cli
from osteofl.protocol import site_key_dir, site_key_paths
from osteofl.runtime import flower_env
from osteofl.server import cli as server_cli
from osteofl.server import provision, provision_cli


def _hospital_key(tmp_path: Path, site: str) -> Path:
    """A site's key pair made at the hospital (osteo-keygen's code); returns its public key file."""
    return keys.make_site_key(tmp_path / "hospitals" / site, site)[1]


def test_provision_creates_ca_and_server_cert_and_registers_public_keys_only(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    for site in ("site_a", "site_b"):
        provision.register_public_key(pki, site, _hospital_key(tmp_path, site))
    paths = provision.provision(pki, ["site_a", "site_b", "site_c"], ["127.0.0.1", "fl.example.org"])
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    assert server.issuer == ca.subject
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes,
                           ec.ECDSA(server.signature_hash_algorithm))  # signed by our CA
    assert set(provision.server_sans(pki)) == {"127.0.0.1", "fl.example.org"}
    assert stat.S_IMODE((pki / "ca.key").stat().st_mode) == 0o600
    assert "site_c_pub" not in paths  # site_c has not sent its key yet
    for site in ("site_a", "site_b"):
        public = serialization.load_ssh_public_key(paths[f"{site}_pub"].read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    # the coordinator's folder holds no site's private key: every file under sites/ is a public key
    assert sorted(p.name for p in (pki / "sites").rglob("*") if p.is_file()) == ["site_a_key.pub", "site_b_key.pub"]
    assert not any(b"PRIVATE KEY" in p.read_bytes() for p in (pki / "sites").rglob("*") if p.is_file())


def test_site_keys_are_private_and_fingerprints_match_openssh(tmp_path: Path) -> None:
    private, public = keys.make_site_key(tmp_path / "keys", "site_a")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and stat.S_IMODE(private.parent.stat().st_mode) == 0o700
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert keys.load_public_key(public).public_numbers() == key.public_key().public_numbers()
    before = private.read_bytes()
    assert keys.make_site_key(tmp_path / "keys", "site_a") == (private, public)
    assert private.read_bytes() == before  # kept, never rotated by a second run
    if shutil.which("ssh-keygen"):  # the fingerprint a hospital can check with standard tools
        out = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True, check=True).stdout
        assert keys.fingerprint(keys.load_public_key(public)) == out.split()[1]


def test_provision_refuses_private_keys_shared_keys_and_silent_rotation(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pub_a = _hospital_key(tmp_path, "site_a")
    with pytest.raises(ConfigError, match="PRIVATE key"):  # the hospital sent the wrong file
        provision.register_public_key(pki, "site_a", pub_a.with_suffix(""))
    (tmp_path / "junk.pub").write_text("ssh-rsa nonsense\n")
    with pytest.raises(ConfigError, match="not an OpenSSH public key"):
        provision.register_public_key(pki, "site_a", tmp_path / "junk.pub")
    target = provision.register_public_key(pki, "site_a", pub_a)
    assert provision.register_public_key(pki, "site_a", pub_a) == target  # the same key again: a no-op
    with pytest.raises(ConfigError, match="already registered for site site_a"):
        provision.register_public_key(pki, "site_b", pub_a)
    with pytest.raises(ConfigError, match="already has a different registered key"):
        provision.register_public_key(pki, "site_a", _hospital_key(tmp_path, "other"))
    assert list(provision.public_keys(pki)) == ["site_a"]


def test_keygen_at_the_site_then_provision_shows_the_same_fingerprint(tmp_path: Path, capsys) -> None:
    root = [f"paths.root={tmp_path}"]
    assert keygen_cli.main(["--site", "site_a", *root]) == 0
    out = capsys.readouterr().out
    private, public = site_key_paths(tmp_path / "data" / "state" / "site_a" / "keys", "site_a")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    fingerprint = next(line.split()[-1] for line in out.splitlines() if line.startswith("fingerprint:"))
    assert public.read_text().strip() in out and fingerprint.startswith("SHA256:")
    assert provision_cli.main(["--sites", "site_a,site_b", "--site-key", f"site_a={public}", *root]) == 0
    out = capsys.readouterr().out
    assert f"site_a: registered public key {fingerprint}" in out and "site_b: no public key yet" in out
    pki_files = [p for p in (tmp_path / "data" / "pki").rglob("*") if p.is_file()]
    assert not [p for p in pki_files if b"PRIVATE KEY" in p.read_bytes() and p.name not in ("ca.key", "server.key")]
    # the private key itself is refused, in one line
    assert provision_cli.main(["--sites", "site_a", "--site-key", f"site_a={private}", *root]) == 1
    err = capsys.readouterr().err.strip()
    assert "PRIVATE key" in err and "\n" not in err


def test_generate_site_keys_puts_each_private_key_in_its_site_folder(tmp_path: Path, capsys) -> None:
    root = [f"paths.root={tmp_path}", "federation.sites=[site_a,site_b]"]
    assert provision_cli.main(["--generate-site-keys", *root]) == 0
    fingerprints = provision.public_keys(tmp_path / "data" / "pki")
    assert set(fingerprints) == {"site_a", "site_b"}
    for site in ("site_a", "site_b"):
        private, public = site_key_paths(site_key_dir(tmp_path / "data" / "state" / site), site)
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        assert keys.fingerprint(keys.load_public_key(public)) == fingerprints[site]
    assert not list((tmp_path / "data" / "pki" / "sites").rglob("*_key"))


def test_register_is_idempotent_per_database(tmp_path: Path, monkeypatch) -> None:
    provision.register_public_key(tmp_path, "site_a", _hospital_key(tmp_path, "site_a"))
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
    with pytest.raises(ConfigError, match="osteo-keygen --site site_a"):  # no public key sent yet
        provision.register_sites(tmp_path, ["site_a"], "osteofl", {}, "/db")
    provision.register_public_key(tmp_path, "site_a", _hospital_key(tmp_path, "site_a"))

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
    with pytest.raises(client_cli.OsteoError, match="run `osteo-keygen --site site_a`"):
        client_cli.supernode_command(args, cfg)
    keys.make_site_key(site_key_dir(cfg.site.state_dir), "site_a")
    cmd = client_cli.supernode_command(args, cfg)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1].endswith("state/site_a/keys/site_a_key")
    assert cmd[cmd.index("--root-certificates") + 1].endswith("ca.pem") and "--insecure" not in cmd
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"  # the SuperNode's own API stays on loopback
    assert parse_config_args([cmd[cmd.index("--node-config") + 1]])["site"] == "site_a"


def test_client_cli_refuses_unprepared_site_in_one_line(tmp_path: Path, capsys) -> None:
    assert client_cli.main(["--site", "nowhere", f"paths.root={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere" in err and "\n" not in err


def test_flower_env_is_private_and_quiet(tmp_path: Path) -> None:
    env = flower_env(tmp_path)
    assert env["FLWR_HOME"] == str(tmp_path) and env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert flower_env(tmp_path, telemetry=True)["FLWR_TELEMETRY_ENABLED"] == "1"
