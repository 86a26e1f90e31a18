"""The opening handshake on the native plane: validation, scope, denials."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("wsmanager.uvicorn")

from tests.native_support import RawClient, frame, serving  # noqa: E402
from tests.servers import AppServer  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    log = tmp_path_factory.mktemp("native") / "server.log"
    with serving("deny_app", log, env={"WSMANAGER_PING_INTERVAL": "3600"}) as s:
        yield s


def attempt(server: AppServer, path: str = "/ws", **headers: str | None) -> RawClient:
    c = RawClient(server.port, handshake=False)
    c.handshake(path, {k.replace("_", "-"): v for k, v in headers.items()})
    return c


def test_accept_key_and_scope(server: AppServer) -> None:
    c = RawClient(server.port, handshake=False)
    c.handshake("/scope?x=1&y=%20", {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                      "Sec-WebSocket-Protocol": "a, b", "X-Custom": "v"})
    assert c.status == 101
    assert c.header("Sec-WebSocket-Accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert c.header("x-extra") == "1"
    assert c.header("server") == "uvicorn"
    info = json.loads(c.recv_data()[1])
    assert info["type"] == "websocket" and info["asgi"]["spec_version"] == "2.4"
    assert info["http_version"] == "1.1" and info["scheme"] == "ws"
    assert info["path"] == "/scope" and info["raw_path"] == "/scope"
    assert info["query_string"] == "x=1&y=%20"
    assert info["subprotocols"] == ["a", "b"]
    assert ["x-custom", "v"] in info["headers"]
    assert info["extensions"] == ["websocket.http.response", "wsmanager.native"]
    assert isinstance(info["handle"], int) and info["handle"] > 0
    assert info["server"][0] == "127.0.0.1" and info["client"][0] == "127.0.0.1"
    assert info["state"] is True
    assert c.expect_close()[0] == 1000
    c.close()


def test_missing_key_400(server: AppServer) -> None:
    c = attempt(server, Sec_WebSocket_Key=None)
    assert c.status == 400 and b"Sec-WebSocket-Key" in c.body()


def test_bad_key_400(server: AppServer) -> None:
    assert attempt(server, Sec_WebSocket_Key="c2hvcnQ=").status == 400


def test_wrong_version_426(server: AppServer) -> None:
    c = attempt(server, Sec_WebSocket_Version="8")
    assert c.status == 426
    assert c.header("Sec-WebSocket-Version") == "13"
    assert c.body()


def test_upgrade_tokens_case_and_lists(server: AppServer) -> None:
    # (a request without "Upgrade: websocket" never reaches the ws protocol: uvicorn serves it as HTTP)
    assert attempt(server, Connection="keep-alive, Upgrade", Upgrade="WebSocket").status == 101


def test_subprotocol_choice(tmp_path: Path) -> None:
    with serving("echo_app", tmp_path / "s.log", env={"WSMANAGER_PING_INTERVAL": "3600"}) as s:
        c = attempt(s, Sec_WebSocket_Protocol="superchat, chat")
        assert c.status == 101 and c.header("Sec-WebSocket-Protocol") == "chat"
        c2 = attempt(s)
        assert c2.status == 101 and c2.header("Sec-WebSocket-Protocol") is None
        c2.send(frame(1, b"ok"))
        assert c2.recv_data() == (1, b"ok")
        c.close()
        c2.close()


def test_origin_allow_list(tmp_path: Path) -> None:
    env = {"WSMANAGER_PING_INTERVAL": "3600",
           "WSMANAGER_ALLOWED_ORIGINS": "https://good.example, http://localhost:3000"}
    with serving("deny_app", tmp_path / "s.log", env=env) as s:
        assert attempt(s, Origin="https://evil.example").status == 403
        assert attempt(s).status == 403  # no Origin at all
        assert attempt(s, Origin="https://good.example").status == 101
        assert attempt(s, Origin="http://localhost:3000").status == 101


def test_app_closes_before_accept_403(server: AppServer) -> None:
    assert attempt(server, "/close").status == 403


def test_app_raises_before_accept_500(server: AppServer) -> None:
    c = attempt(server, "/raise")
    assert c.status == 500


def test_app_returns_without_accept_500(server: AppServer) -> None:
    assert attempt(server, "/return").status == 500


def test_http_response_extension(server: AppServer) -> None:
    c = attempt(server, "/http")
    assert c.status == 418
    assert c.header("x-denied") == "yes"
    assert c.body() == b"no tea"


def test_oversized_header_rejected(server: AppServer) -> None:
    c = attempt(server, X_Big="v" * 20000)
    assert c.status in (400, 431)


def test_server_keeps_serving_after_denials(server: AppServer) -> None:
    c = attempt(server, "/ok")
    assert c.status == 101
    c.close()


def test_tls_connections_fall_back_to_uvicorn_protocol(tmp_path: Path) -> None:
    import ssl
    import subprocess

    from websockets.sync.client import connect

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with serving("fastapi_app", tmp_path / "tls.log",
                 extra=["--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]) as s:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with connect(f"wss://127.0.0.1:{s.port}/ws", ssl=ctx) as ws:
            ws.send(json.dumps({"tls": True}))
            assert json.loads(ws.recv(timeout=5)) == {"echo": {"tls": True}}
