"""The repaired wheel as a user meets it, on a machine without libwslay.

``make wheel`` (run by ``make test`` before pytest) leaves dist/wsmanager-*-cpXY-cpXY-manylinux*.whl.
The test installs it, from the file, into a fresh venv in a temp dir outside the checkout, and
runs everything in a mount namespace (``unshare -m``) where an empty file is bind-mounted over
the system's libwslay: there only the copy the wheel bundles can load. In there it checks that
``wsmanager._core`` loads that copy (``/proc/self/maps`` and ``ldd``), and serves a tiny app with
``python -m wsmanager`` (native plane) and with stock uvicorn (its default ws, the portable
plane), one WebSocket echo round trip on each. It also checks that setup.py, when wslay is
missing, stops with a message naming the package to install.

Marked ``wheel``: ``pytest -m 'not wheel'`` leaves these out.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import AppServer

pytestmark = [pytest.mark.wheel, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
TAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"


def _need(ok: bool, why: str) -> None:
    """Skip on a developer's machine; on CI (`make test` builds and installs everything) fail."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def _wheel() -> Path:
    found = sorted((ROOT / "dist").glob(f"wsmanager-*-{TAG}-{TAG}-*manylinux*.whl"),
                   key=lambda p: p.stat().st_mtime)
    _need(bool(found), f"no repaired {TAG} wheel in dist/ (make wheel builds it)")
    return found[-1]


def _system_libwslay() -> list[str]:
    """The files the dynamic loader would find for libwslay.so.1 (their real paths)."""
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    paths = {os.path.realpath(line.rsplit("=>", 1)[1].strip())
             for line in out.splitlines() if "libwslay.so" in line and "=>" in line}
    return sorted(p for p in paths if os.path.isfile(p))


# Runs "$@" after bind-mounting $EMPTY over each file named before "--" (private mounts: nothing
# leaves the namespace).
_HIDE = 'while [ "$1" != -- ]; do mount --bind "$EMPTY" "$1" || exit 97; shift; done; shift; exec "$@"'


@pytest.fixture(scope="module")
def unshare_ok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ok = shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "true"], capture_output=True).returncode == 0
    _need(ok, "unshare -m does not work here (needs root or CAP_SYS_ADMIN)")
    empty = tmp_path_factory.mktemp("hide") / "empty"
    empty.write_bytes(b"")
    return empty


def _hidden(empty: Path, hide: list[str], cmd: list[str]) -> list[str]:
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", _HIDE, "sh", *hide, "--", *cmd]


APP = '''
import uuid

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocketDisconnect

import wsmanager._core
from wsmanager import ws_manager


async def echo(websocket):
    cid = str(uuid.uuid4())
    if not await ws_manager.connect(websocket, cid, "smoke"):
        return
    plane = "native" if "wsmanager.native" in websocket.scope.get("extensions", {}) else "portable"
    try:
        while True:
            text = await websocket.receive_text()
            await ws_manager.send_message(cid, {"echo": text, "plane": plane,
                                                "core": wsmanager._core.__file__})
    except WebSocketDisconnect:
        pass
    finally:
        await ws_manager.disconnect(cid)


app = Starlette(routes=[WebSocketRoute("/ws", echo)])
'''

PROBE = '''
import ctypes, json, subprocess, sys
import wsmanager, wsmanager._core as core
try:
    ctypes.CDLL("libwslay.so.1")
    system = "loaded"
except OSError as e:
    system = str(e)
maps = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libwslay" in line})
ldd = subprocess.run(["ldd", core.__file__], capture_output=True, text=True).stdout
print(json.dumps({"core": core.__file__, "package": wsmanager.__file__, "maps": maps,
                  "ldd": [l.strip() for l in ldd.splitlines() if "wslay" in l],
                  "system": system, "prefix": sys.prefix}))
'''


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the checkout with the wheel installed, plain (`pip install wsmanager`)."""
    wheel = _wheel()
    where = tmp_path_factory.mktemp("wheel-venv")
    assert ROOT not in where.resolve().parents, where
    env_dir = where / "venv"
    # No ensurepip in the new venv: this venv's pip installs into it (pip --python).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    _pip(py, str(wheel))
    return env_dir


def _pip(py: Path, *what: str) -> None:
    run = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                          "--disable-pip-version-check", *what], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def _clean_env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    return {**keep, "PYTHONNOUSERSITE": "1", **extra}


def test_bundled_libwslay_loads_without_the_system_one(venv: Path, unshare_ok: Path) -> None:
    hide = _system_libwslay()
    work = venv.parent
    (work / "probe.py").write_text(PROBE)
    run = subprocess.run(_hidden(unshare_ok, hide, [str(venv / "bin" / "python"), "probe.py"]),
                         cwd=work, env=_clean_env(EMPTY=str(unshare_ok)),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    got = json.loads(run.stdout)
    libs = str(venv.resolve() / "lib") + "/"
    assert got["package"].startswith(libs) and got["core"].startswith(libs), got  # not the checkout
    if hide:  # the system copy is there, but not for this process
        assert got["system"] != "loaded", got
    assert got["maps"] and all("/site-packages/wsmanager.libs/libwslay" in m for m in got["maps"]), got
    assert got["ldd"] and all("wsmanager.libs/libwslay" in line for line in got["ldd"]), got


def _server(venv: Path, empty: Path, hide: list[str], plane: str) -> AppServer:
    """The smoke app served from the venv, outside the checkout, with ``hide`` hidden: "native"
    is ``python -m wsmanager``, "portable" stock uvicorn with its default --ws (websockets)."""
    work = venv.parent
    (work / "smoke_app.py").write_text(APP)
    return AppServer("smoke_app:app", "native" if plane == "native" else "uvicorn",
                     via_main=plane == "native", python=venv / "bin" / "python", cwd=work,
                     environ=_clean_env(EMPTY=str(empty)), prefix=_hidden(empty, hide, []),
                     log_path=work / f"server-{plane}.log", log_level=None, lifespan="off",
                     ready_timeout=20)


def _echo(port: int) -> dict:
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:
        ws.send("hello")
        return json.loads(ws.recv(timeout=10))


@pytest.fixture(scope="module")
def served_venv(venv: Path) -> Path:
    """The same venv with the `native` extra: uvicorn, and websockets for stock uvicorn's ws."""
    _pip(venv / "bin" / "python", f"{_wheel()}[native]")
    return venv


@pytest.mark.parametrize("plane", ["native", "portable"])
def test_echo_round_trip_from_the_wheel(served_venv: Path, unshare_ok: Path, plane: str) -> None:
    with _server(served_venv, unshare_ok, _system_libwslay(), plane) as server:
        reply = _echo(server.port)
    assert reply["echo"] == "hello", reply
    assert reply["plane"] == plane, (reply, server.log())
    assert reply["core"].startswith(str(served_venv.resolve() / "lib")), reply


# ------------------------------------------------------------------ the sdist without wslay

def _wslay_header_dir() -> str | None:
    probe = subprocess.run(["cpp", "-H", "-o", "/dev/null"], input="#include <wslay/wslay.h>\n",
                           capture_output=True, text=True)
    for line in probe.stderr.splitlines():
        if line.startswith(". "):
            return os.path.dirname(line[2:].strip())
    return None


@pytest.mark.parametrize("missing", ["header", "library"])
def test_build_without_wslay_names_the_package(tmp_path: Path, unshare_ok: Path, missing: str) -> None:
    """setup.py build_ext on a machine view without wslay's header (or its library): a message
    naming the package of each distribution, before gcc's bare "wslay/wslay.h: No such file".
    (The check passing where wslay is installed is what every `make build` does.)"""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".*", "build", "dist", "tests", "benchmarks", "examples", "fuzz", "*.egg-info", "*.so",
        "__pycache__", "node_modules"))
    hide_dir = tmp_path / "no-wslay"
    hide_dir.mkdir()
    header_dir = _wslay_header_dir()
    # The header directory gets an empty directory mounted over it, the library (libwslay.so and
    # libwslay.so.1 are links to one file) an empty file.
    if missing == "header":
        _need(header_dir is not None, "wslay's header is not installed (make sysdeps)")
        script, hide = 'mount --bind "$NODIR" "$HDR" || exit 97; ' + _HIDE, []
    else:
        _need(bool(_system_libwslay()), "libwslay is not installed (make sysdeps)")
        script, hide = _HIDE, _system_libwslay()
    env = _clean_env(EMPTY=str(unshare_ok), NODIR=str(hide_dir), HDR=header_dir or "")
    run = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
         *hide, "--", sys.executable, "setup.py", "-q", "build_ext",
         "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
        cwd=src, env=env, capture_output=True, text=True, timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    for package in ("libwslay-dev", "wslay-devel", "wslay-dev", "brew install wslay"):
        assert package in out, out
    assert "wslay was not found" in out, out
    assert ("does not compile" if missing == "header" else "-lwslay does not link") in out, out
    assert "fatal error" not in out.split("The compiler said:")[0], out  # the compiler only quoted
    assert not list((tmp_path / "tmp").rglob("*.o")), "compiled before checking for wslay"

