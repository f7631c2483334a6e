"""The deployment recipe that gives hospitals the Fleet API alone (``flower-server --proxy-config``): the
rendered nginx config, and, where nginx is installed, a live TLS SuperLink behind it that answers Fleet
requests through the proxy while Control, Runtime, /health, /docs and /openapi.json do not get through."""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from pathlib import Path

import httpx
import pytest

from osteo_model.config import compose
from osteo_model.errors import ConfigError
from osteofl import runtime
from osteofl.server import cli as server_cli
from osteofl.server import provision, proxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _blocks(text: str) -> dict[str, str]:
    """``location`` path -> its body (the config has no nested braces inside locations)."""
    return dict(re.findall(r"location\s+(?:\^~\s+)?(\S+)\s*\{([^}]*)\}", text))


def test_rendered_config_passes_on_the_fleet_api_alone(tmp_path: Path) -> None:
    cfg = compose([f"paths.root={tmp_path}", "federation.superlink.port=9092"])
    text = proxy.render(cfg, "0.0.0.0:9443", tmp_path / "proxy")
    assert re.search(r"listen 0\.0\.0\.0:9443 ssl;", text)
    blocks = _blocks(text)
    assert set(blocks) == {"/v1/fleet/", "/"}
    assert "proxy_pass https://127.0.0.1:9092;" in blocks["/v1/fleet/"] and "proxy_ssl_verify on;" in blocks["/v1/fleet/"]
    assert "return 404;" in blocks["/"] and "proxy_pass" not in blocks["/"]
    assert text.count("proxy_pass") == 1
    pki = (tmp_path / "data" / "pki").resolve()
    assert f"ssl_certificate {pki / 'server.pem'};" in text and f"proxy_ssl_trusted_certificate {pki / 'ca.pem'};" in text


def test_proxy_refuses_a_superlink_that_is_not_on_loopback(tmp_path: Path, capsys) -> None:
    cfg = compose([f"paths.root={tmp_path}", "federation.superlink.host=0.0.0.0"])
    with pytest.raises(ConfigError, match="must stay on loopback"):
        proxy.render(cfg, "0.0.0.0:9443", tmp_path)
    assert server_cli.main(["--proxy-config", "nonsense", f"paths.root={tmp_path}"]) == 1
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert server_cli.main(["--proxy-config", "0.0.0.0:9443", f"paths.root={tmp_path}"]) == 0
    assert (tmp_path / "outputs" / "superlink" / "proxy" / "nginx.conf").is_file()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_live_proxy_serves_fleet_and_hides_control_runtime_and_docs(tmp_path: Path) -> None:
    pki = tmp_path / "data" / "pki"
    provision.make_ca(pki)
    provision.make_server_cert(pki, ["127.0.0.1"])
    port, public = _free_port(), _free_port()
    cfg = compose([f"paths.root={tmp_path}", f"federation.superlink.port={port}"])
    conf = proxy.write(cfg, f"127.0.0.1:{public}", tmp_path / "proxy")
    env = runtime.flower_env(tmp_path / "flwr_home")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    with open(tmp_path / "superlink.log", "wb") as log:
        superlink = runtime.start(server_cli.superlink_command(cfg, False, tmp_path / "state.db"), env, log)
    nginx = runtime.start(["nginx", "-p", str(conf.parent), "-c", str(conf), "-e", str(conf.parent / "error.log")], env)
    try:
        assert runtime.wait_for_port("127.0.0.1", port, 120, superlink), (tmp_path / "superlink.log").read_text()
        assert runtime.wait_for_port("127.0.0.1", public, 30, nginx), (conf.parent / "error.log").read_text()
        headers = {"content-type": "application/protobuf"}
        with httpx.Client(verify=str(pki / "ca.pem"), timeout=30) as client:
            def status(base: int, path: str, method: str = "POST") -> int:
                return client.request(method, f"https://127.0.0.1:{base}{path}", content=b"", headers=headers).status_code

            # on loopback the SuperLink answers everything (these are real routes) ...
            assert status(port, "/v1/control/list-runs") != 404
            assert status(port, "/docs", "GET") == 200 and status(port, "/openapi.json", "GET") == 200
            # ... through the proxy only the Fleet API gets through, with the SuperLink's own answer
            fleet = status(port, "/v1/fleet/get-run")
            assert fleet != 404 and status(public, "/v1/fleet/get-run") == fleet
            for path in ("/v1/control/list-runs", "/v1/control/stop-run", "/v1/runtime/get-nodes", "/health"):
                assert status(public, path) == 404, path
            for path in ("/docs", "/openapi.json"):
                assert status(public, path, "GET") == 404, path
    finally:
        runtime.stop(nginx, superlink)
