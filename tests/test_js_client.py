"""The JS client under ``node --test``: unit tests against an in-memory socket, and live tests
against the chat example on a real uvicorn (server restarts included)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import UVICORN_SERVER_PLANES, unless_installed
from tests.servers import ROOT, AppServer, Controller

NODE = shutil.which("node")
pytestmark = unless_installed(NODE is None, "node")


def node_flags() -> list[str]:
    """Node 22+ has a global WebSocket; Node 20/21 need --experimental-websocket."""
    version = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout
    major = int(version.strip().lstrip("v").split(".")[0])
    return ["--experimental-websocket"] if major < 22 else []


def run_node(files: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [NODE, *node_flags(), "--test", "--test-reporter=spec", *files]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_js_client_unit():
    result = run_node(["tests/js/client_unit.test.mjs"], {}, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fail 0" in result.stdout.replace("ℹ ", "")


@pytest.mark.parametrize("plane", UVICORN_SERVER_PLANES)
def test_js_client_live(plane, tmp_path):
    # channel names are for admins only in /ws/stats (they may carry user ids)
    token = "js-test-admin"
    server = AppServer("examples.chat.app:app", plane, log_path=tmp_path / "server.log", graceful=2,
                       env={"WSMANAGER_ADMIN_TOKEN": token}, own_session=True)
    with server, Controller(server) as control:
        result = run_node(["tests/js/client_live.test.mjs"],
                          {"WSM_URL": server.url(), "WSM_CONTROL": control.url, "WSM_ADMIN": token},
                          timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output + "\n--- server log ---\n" + server.log_tail()
    assert "fail 0" in output.replace("ℹ ", "")
