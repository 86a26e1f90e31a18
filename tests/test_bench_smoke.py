"""Smoke test of the benchmark tools (not a benchmark): builds the C load client and the one-send
floor, and runs the client for about a second against 10 connections -- on the floor and on the
benchmark app (benchmarks/wsm_app.py, stock uvicorn) -- asserting that every message reached every
receiver exactly once and in order; and the driver's density scenario at a tiny N (its figures, and
that a run of it alone leaves the other sections of the report as they were); the load client's
permessage-deflate against the native plane; the compressed-broadcast scenario at a tiny N."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import unless_installed
from tests.ports import free_port
from tests.servers import AppServer, native_available

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the load client needs Linux (epoll)"),
    unless_installed(shutil.which("gcc") is None, "gcc"),
]


@pytest.fixture(scope="module")
def bins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C tools built by their one recipe, benchmarks/Makefile, into a scratch directory."""
    out = tmp_path_factory.mktemp("benchbin")
    subprocess.run(["make", "-s", "-C", str(BENCH), f"BUILD={out}"], check=True)
    return out


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_client(bins: Path, port: int, pid: int, path: str, *args: str) -> list[dict]:
    r = subprocess.run([str(bins / "loadclient"), "--port", str(port), "--path", path, "--watch-pid", str(pid),
                        "-n", "10", *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def check(events: list[dict], mode: str) -> None:
    conn = next(e for e in events if e["event"] == "connected")
    assert conn["open"] == 10 and conn["failed"] == 0 and conn["rate"] > 0
    phases = [e for e in events if e["event"] == "phase"]
    assert phases and all(p["mode"] == mode for p in phases)
    for p in phases:
        assert p["deliveries"] > 0 and p["dps"] > 0
        assert p["lost"] == 0 and p["incomplete"] == 0 and p["dup"] == 0 and p["ooo"] == 0 and p["closed"] == 0
        assert 0 <= p["p50_ms"] <= p["p99_ms"] <= p["max_ms"]
        assert p["server_cpu"] >= 0 and p["client_cpu"] >= 0
        if mode == "broadcast":
            assert p["deliveries"] == p["msgs"] * 9  # every message to the 9 other connections


def test_loadclient_against_floor(bins: Path) -> None:
    port = free_port()
    srv = subprocess.Popen([str(bins / "floor_onesend"), str(port)])
    try:
        wait_port(port, srv)
        check(run_client(bins, port, srv.pid, "/ws?u={i}", "--mode", "broadcast", "--sizes", "64,4096",
                         "--duration", "0.4"), "broadcast")
        check(run_client(bins, port, srv.pid, "/ws?u={i}", "--mode", "chat", "--senders", "3", "--rates", "200",
                         "--duration", "0.5", "--grace", "1"), "chat")
        check(run_client(bins, port, srv.pid, "/ws?u={i}", "--mode", "echo", "--duration", "0.3"), "echo")
    finally:
        stop(srv)


def test_loadclient_against_benchmark_app(bins: Path) -> None:
    with AppServer("benchmarks.wsm_app:app", "uvicorn", lifespan="off",
                   env={"WSMANAGER_MAX_CONNECTIONS_PER_USER": "0"}) as srv:
        check(run_client(bins, srv.port, srv.pid, "/api/v1/ws?token=tok-u{i}", "--mode", "broadcast",
                         "--duration", "1"), "broadcast")


def test_loadclient_deflate_against_the_native_plane(bins: Path) -> None:
    """--deflate 1 --filler text: every connection negotiates compression, every broadcast
    arrives compressed and inflates to the message (the sequence numbers inside check it), and
    fewer bytes arrive than with --deflate 0."""
    if not native_available():
        pytest.skip("the native plane is not built")
    with AppServer("benchmarks.wsm_app:app", "native", lifespan="off",
                   env={"WSMANAGER_MAX_CONNECTIONS_PER_USER": "0"}) as srv:
        wire = {}
        for offer in ("1", "0"):
            events = run_client(bins, srv.port, srv.pid, "/api/v1/ws?token=tok-u{i}", "--mode", "broadcast",
                                "--sizes", "700", "--duration", "0.5", "--filler", "text", "--deflate", offer)
            check(events, "broadcast")
            conn = next(e for e in events if e["event"] == "connected")
            (phase,) = [e for e in events if e["event"] == "phase"]
            assert conn["deflate"] == (10 if offer == "1" else 0)
            assert phase["inflated"] == phase["compressed"] == (phase["deliveries"] if offer == "1" else 0)
            wire[offer] = phase["rx_bytes"] / phase["deliveries"]
        assert wire["0"] > 700 and wire["1"] < wire["0"] / 2, wire


@pytest.mark.timeout(240)
def test_driver_density_scenario(tmp_path: Path) -> None:
    """benchmarks/run.py's density scenario at N = 8 and 16, into a scratch directory that holds a
    copy of the committed raw results: a run of density alone adds its section and keeps every
    other section of RESULTS.md as it was (the report is rewritten from results/raw.json, so the
    driver merges its figures into the previous raw.json)."""
    (tmp_path / "results").mkdir()
    shutil.copy(BENCH / "results" / "raw.json", tmp_path / "results" / "raw.json")

    def driver(*args: str) -> None:
        r = subprocess.run([sys.executable, str(BENCH / "run.py"), *args, "--out", str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=200)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    driver("--report-only")  # RESULTS.md as the driver writes it from the committed raw.json
    before = (tmp_path / "RESULTS.md").read_text()
    driver("--quick", "--scenarios", "density", "--density-ns", "8,16")

    R = json.loads((tmp_path / "results" / "raw.json").read_text())
    old = json.loads((BENCH / "results" / "raw.json").read_text())
    assert R["servers"] == old["servers"] and R["machine"] == old["machine"]  # the other sections: untouched
    D = R["density"]["results"]
    keys = ["floor-onesend", "ref"] + (["wsm-native", "wsm-detached"] if native_available() else [])
    assert D["keys"] == keys and D["ns"] == [8, 16]
    for key in keys:
        bcast = {rec["n"]: rec for rec in D["closed"][key]}
        assert sorted(bcast) == [8, 16]
        for n, rec in bcast.items():
            assert rec["connected"]["open"] == n + 1 and rec["phases"]
            assert all(p["lost"] == 0 and p["dup"] == 0 and p["ooo"] == 0 and p["deliveries"] > 0
                       for p in rec["phases"])
        if key == "floor-onesend":
            continue
        idle = {rec["n"]: rec for rec in D["idle"][key]}
        assert sorted(idle) == [8, 16]
        for n, rec in idle.items():
            assert rec["open"] == n and rec["failed"] == 0
            assert rec["rss_idle"] > 0 and rec["objects_idle"] > 0 and rec["forced_collect_ms"] > 0
            assert rec["get_stats_ms"] is not None and rec["get_stats_total"] == n

    def split(report: str) -> tuple[str, str]:
        """(the density section, the report without it)."""
        start = report.find("## Density:")
        if start < 0:
            return "", report
        end = report.index("\n## ", start) + 1
        return report[start:end], report[:start] + report[end:]

    section, others = split((tmp_path / "RESULTS.md").read_text())
    assert section and others == split(before)[1]  # only the density section is new
    for key in keys:
        assert f"| {key} | 16 |" in section
    assert "RSS at 1 000 000" in section and "fit, all N" in section
    if native_available():
        assert "| wsm-detached | fit, all N |" in section and "detached at 16" in section
    assert (tmp_path / "charts" / "density.png").exists()


@pytest.mark.timeout(240)
def test_driver_deflate_scenario(tmp_path: Path) -> None:
    """benchmarks/run.py's compressed-broadcast scenario at 20 receivers and 100 idle connections
    (--quick --scale 0.2) into a scratch copy of the committed results: its section is added, the
    others stay, every variant measured, and what the receivers negotiated is what it says."""
    (tmp_path / "results").mkdir()
    shutil.copy(BENCH / "results" / "raw.json", tmp_path / "results" / "raw.json")
    r = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--scale", "0.2", "--scenarios", "deflate",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    R = json.loads((tmp_path / "results" / "raw.json").read_text())
    old = json.loads((BENCH / "results" / "raw.json").read_text())
    assert R["servers"] == old["servers"] and R.get("density") == old.get("density")
    D = R["deflate"]["results"]
    want = ["native-z", "native-plain", "stock-z", "stock-plain"] if native_available() else ["stock-z", "stock-plain"]
    assert D["variants"] == want
    for name in want:
        (rec,) = D["closed"][name]
        assert rec["connected"]["deflate"] == (21 if name.endswith("-z") else 0)
        assert sorted(p["size"] for p in rec["phases"]) == [700, 9000]
        for p in rec["phases"]:
            assert p["deliveries"] > 0 and p["lost"] == 0 and p["dup"] == 0 and p["ooo"] == 0
            assert p["compressed"] == (p["deliveries"] if name.endswith("-z") else 0)
            assert 0 < p["inflated"] < p["deliveries"] if name.endswith("-z") else p["inflated"] == 0
            assert p["rx_bytes"] / p["deliveries"] < (p["size"] / 2 if name.endswith("-z") else p["size"] + 64)
        (idle,) = D["idle"][name]
        assert idle["open"] == 100 and idle["deflate"] == (100 if name.endswith("-z") else 0)
        assert idle["rss_per_conn"] is not None
    report = (tmp_path / "RESULTS.md").read_text()
    assert "## Compressed broadcast (permessage-deflate)" in report and "Targets (issue 13" in report
