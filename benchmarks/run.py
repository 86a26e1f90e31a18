#!/usr/bin/env python3
"""The benchmark driver: wsmanager against the seed's pure-Python manager and two C floors.

    .venv/bin/python benchmarks/run.py            # make bench        (~22 minutes on 2 cores)
    .venv/bin/python benchmarks/run.py --quick    # make bench-quick  (under 2 minutes)
    .venv/bin/python benchmarks/run.py --only ref,wsm-native --scenarios closed,echo

Servers (all single-process, on 127.0.0.1, each on a free port):
  ref             benchmarks/reference_app.py on stock uvicorn (its default ws implementation)
  ref-wsproto     the same with --ws wsproto
  wsm-portable    benchmarks/wsm_app.py on stock uvicorn (wsmanager's portable plane)
  wsm-native      benchmarks/wsm_app.py with --ws wsmanager.uvicorn:WebSocketProtocol
  bare, bare-native  benchmarks/bare_app.py (FastAPI endpoint, no manager), stock and native;
                  idle scenario only, left out of --quick
  wsm-detached    benchmarks/wsm_app.py's detached endpoint (ws_manager.serve(), /api/v1/detached/ws)
                  on the native plane; density scenario only
  floor-onesend   benchmarks/floor_onesend.c (one send() per receiver per frame)
  floor-coalesce  benchmarks/floor_coalesce.c (one send() per receiver per loop iteration)

Scenarios (per server unless noted; every measurement is repeated --runs times, 5 for closed,
medians kept; closed, loop and echo interleave the servers round by round):
  idle     hold N idle connections: connect+handshake rate, RSS and GC-tracked objects per
           connection, longest gen-2 pause, get_stats() in-process and GET /api/v1/ws/stats
  closed   closed-loop broadcast, 64 B and 4 KiB, to 1 000 and 10 000 receivers
  loop     HTTP GET /health every 10 ms while broadcasts to 5 000 run back to back
  echo     100 connections, one message in flight each
  chat     10 senders open-loop, 1 000 receivers, a rate ramp; all servers run at once and are
           interleaved at each rate; a server leaves the ramp at its first rate with loss or
           p99 >= 250 ms (majority of runs)
  sweep    wsmanager._core.Registry: 100 000 open connections, sweep() timed (none due / all due)
           and a Python thread's longest stall during the sweeps (the GIL is released inside)
  density  (not in the default set: --scenarios density) for N = 1 000, 5 000, 19 000 and the
           servers ref, wsm-native, wsm-detached: the idle measurements on a fresh server, then
           closed-loop broadcasts (64 B) to all N against floor-onesend at the same N, interleaved;
           per-connection figures N-averaged and as the slope between the N values, RSS and gen-2
           pause extrapolated to 100 000 and 1 000 000. A run of density alone merges into the
           previous results/raw.json (the other sections stay), and a run without it keeps the
           previous density section
  deflate  (not in the default set: --scenarios deflate) "compressed broadcast": closed-loop
           broadcasts from one sender to 1 000 receivers of a ~700 B chat message and a ~9 KB
           snapshot (JSON-like text, --filler text), for the native plane with the receivers
           negotiating permessage-deflate and without, and the seed's manager on stock uvicorn
           (websockets, which compresses by default) with and without, interleaved round by round:
           server CPU and bytes on the wire per delivery; then, each on a fresh server, the idle
           measurements with and without compression negotiated (RSS per idle connection). A run
           of deflate and/or density alone merges into the previous results/raw.json
  profile  perf record of wsm-native and the one-send floor during a closed-loop broadcast;
           py-spy of wsm-native and ref during a connect ramp and an echo phase
           (left out of --quick; skipped without perf)

Per run: server CPU (utime+stime from /proc/<pid>/stat, all threads), client CPU (getrusage)
and the CPU of every other process (per-pid /proc deltas), measured by the load client around
each phase; server RSS before / with N connections / after. Raw results go to
benchmarks/results/raw.json, the report to benchmarks/RESULTS.md, charts to benchmarks/charts/.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
BUILD = BENCH / "build"
OUT = BENCH / "results"
CHARTS = BENCH / "charts"
REPORT_DIR = BENCH  # RESULTS.md goes here (--out moves it, results/ and charts/ together)
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")
WS_PATH = "/api/v1/ws?token=tok-u{i}"
DETACHED_PATH = "/api/v1/detached/ws?token=tok-u{i}"
sys.path.insert(0, str(ROOT))
from wsmanager.__main__ import NATIVE_WS  # noqa: E402 - the protocol class path, owned by the library

SERVERS: dict[str, dict[str, Any]] = {
    "ref": {"label": "reference, uvicorn default ws", "app": "benchmarks.reference_app:app", "extra": []},
    "ref-wsproto": {"label": "reference, uvicorn --ws wsproto", "app": "benchmarks.reference_app:app",
                    "extra": ["--ws", "wsproto"]},
    "wsm-portable": {"label": "wsmanager, portable plane", "app": "benchmarks.wsm_app:app", "extra": []},
    "wsm-native": {"label": "wsmanager, native plane", "app": "benchmarks.wsm_app:app",
                   "extra": ["--ws", NATIVE_WS]},
    # the native plane with the kernel's default slice for the event-loop thread: what the short
    # slice (wsmanager.uvicorn, WSMANAGER_LOOP_SLICE_US) does to the HTTP latency during broadcasts
    "wsm-native-slice0": {"label": "wsmanager, native plane, WSMANAGER_LOOP_SLICE_US=0 (event-loop freedom only)",
                          "app": "benchmarks.wsm_app:app", "extra": ["--ws", NATIVE_WS],
                          "env": {"WSMANAGER_LOOP_SLICE_US": "0"}, "scenarios": {"loop"}},
    "bare": {"label": "bare FastAPI endpoint, no manager (idle only)", "app": "benchmarks.bare_app:app", "extra": [],
             "manager": False, "scenarios": {"idle"}},
    "bare-native": {"label": "bare FastAPI endpoint, no manager, native protocol (idle only)",
                    "app": "benchmarks.bare_app:app", "extra": ["--ws", NATIVE_WS], "manager": False,
                    "scenarios": {"idle"}},
    # the detached shape (ws_manager.serve(): the endpoint returns) of the same endpoint, same app
    "wsm-detached": {"label": "wsmanager, native plane, detached endpoint (serve(); density only)",
                     "app": "benchmarks.wsm_app:app", "extra": ["--ws", NATIVE_WS], "path": DETACHED_PATH,
                     "scenarios": {"density"}},
    "floor-onesend": {"label": "C floor, one send per frame", "floor": "floor_onesend"},
    "floor-coalesce": {"label": "C floor, coalescing", "floor": "floor_coalesce"},
}
PY_SERVERS = [k for k, v in SERVERS.items() if "app" in v]


def takes_part(key: str, scenario: str) -> bool:
    """Servers with a "scenarios" set run only those (the rest run every scenario)."""
    return scenario in SERVERS[key].get("scenarios", (scenario,))

LOG: list[str] = []


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    LOG.append(line)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (200_000, hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
            return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def kernel_mem() -> dict:
    """The machine's kernel memory that grows with sockets: slab (struct sock, file, dentry,
    epoll items ...; /proc/meminfo) and TCP buffer pages (/proc/net/sockstat), in bytes."""
    out = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Slab:"):
                out["slab"] = int(line.split()[1]) * 1024
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                f = line.split()
                out["tcp_mem"] = int(f[f.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE")
                out["tcp_inuse"] = int(f[f.index("inuse") + 1])
    return out


def proc_rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------
# build


def build() -> None:
    """The C parts (load client, HTTP prober, floors): benchmarks/Makefile is their one recipe."""
    subprocess.run(["make", "-s", "-C", str(BENCH)], check=True)


def native_available() -> tuple[bool, str]:
    r = subprocess.run([PY, "-c", "import wsmanager.uvicorn"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return r.returncode == 0, (r.stderr.strip().splitlines() or [""])[-1]


# ---------------------------------------------------------------------------------------------
# servers


class Server:
    def __init__(self, key: str) -> None:
        self.key = key
        self.spec = SERVERS[key]
        self.is_py = "app" in self.spec
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = OUT / "logs" / f"{key}.log"

    def start(self) -> "Server":
        self.port = free_port()
        if self.is_py:
            cmd = [PY, "-m", "uvicorn", self.spec["app"], "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "warning", "--lifespan", "off", "--timeout-graceful-shutdown", "3",
                   *self.spec["extra"]]
        else:
            cmd = [str(BUILD / self.spec["floor"]), str(self.port)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "REF_PING_TIMEOUT": "3600",
               "WSMANAGER_MAX_CONNECTIONS_PER_USER": "0", **self.spec.get("env", {})}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
        self._log.flush()
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=raise_nofile)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.key} exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                if self.is_py:
                    self.get("/health")
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.key} did not start")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return proc_rss(self.pid)

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def get(self, path: str, timeout: float = 60) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.proc = None


def run_client(server: Server, args: list[str], on_connected: Callable[[dict, subprocess.Popen], None] | None = None,
               timeout: float = 600, on_event: Callable[[dict, subprocess.Popen], None] | None = None) -> list[dict]:
    cmd = [str(BUILD / "loadclient"), "--port", str(server.port), "--path", server.spec.get("path", WS_PATH),
           "--src", "8", "--watch-pid", str(server.pid), *map(str, args)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=raise_nofile)
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    events: list[dict] = []
    try:
        assert p.stdout is not None
        for line in p.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                ev = json.loads(line)
                events.append(ev)
                if ev.get("event") == "connected":
                    if ev["failed"]:
                        log(f"  {server.key}: {ev['failed']} of {ev['n']} connections failed")
                    if on_connected:
                        on_connected(ev, p)
                if on_event:
                    on_event(ev, p)
        p.wait()
    finally:
        timer.cancel()
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read() if p.stderr else ""
    if err.strip():
        log(f"  loadclient stderr: {err.strip()[:300]}")
    if server.proc is not None and server.proc.poll() is not None:
        log(f"  {server.key} DIED (exit {server.proc.returncode}); see {server.log_path}")
    return events


def run_prober(port: int, path: str, seconds: float, interval_ms: float = 10) -> subprocess.Popen:
    return subprocess.Popen([str(BUILD / "http_prober"), str(port), path, str(seconds), str(interval_ms)],
                            stdout=subprocess.PIPE, text=True)


def prober_result(p: subprocess.Popen) -> dict | None:
    out, _ = p.communicate(timeout=120)
    with contextlib.suppress(json.JSONDecodeError, IndexError):
        return json.loads(out.strip().splitlines()[-1])
    return None


def phases(events: list[dict]) -> list[dict]:
    out = []
    for ev in events:
        if ev.get("event") == "phase":
            ev["cpu_us_per_delivery"] = ev["server_cpu"] / ev["deliveries"] * 1e6 if ev["deliveries"] else None
            out.append(ev)
    return out


def connected(events: list[dict]) -> dict:
    return next((e for e in events if e.get("event") == "connected"), {})


# ---------------------------------------------------------------------------------------------
# scenarios


def scen_idle(key: str, n: int, cycles: int, probe_s: float = 2.0) -> list[dict]:
    """Each cycle on a fresh server process: RSS freed by a previous cycle would be reused."""
    out = []
    for c in range(cycles):
        srv = Server(key).start()
        try:
            out.append(_idle_cycle(srv, n, c, probe_s))
        finally:
            srv.stop()
    return out


def _idle_cycle(srv: Server, n: int, c: int, probe_s: float, settle: float = 1.0,
                client: tuple[str, ...] = ()) -> dict:
    """N idle connections on srv; `settle`: seconds to wait for RSS to settle after connecting
    (and 1.5× that after the client left); `client`: more load-client options."""
    rec: dict[str, Any] = {"n": n, "cycle": c}
    if srv.is_py:
        g0 = srv.get("/bench/gc?collect=1&reset=1&types=1")
        rec["objects_before"] = g0["objects"]
        types0 = g0.get("types", {})
    time.sleep(0.3)
    rec["rss_before"] = srv.rss()
    rec["fds_before"] = proc_fds(srv.pid)
    rec["kernel_before"] = kernel_mem()

    def on_conn(ev: dict, p: subprocess.Popen) -> None:
        time.sleep(settle)
        rec["rss_idle"] = srv.rss()
        rec["fds_idle"] = proc_fds(srv.pid)
        rec["kernel_idle"] = kernel_mem()
        if srv.is_py:
            g = srv.get("/bench/gc")  # natural gen-2 pauses while connecting, before any forced one
            rec["gen2_natural_max_ms"] = g["gen2_window_max_ms"]
            rec["gen2_count"] = g["gen2_count"]
            g = srv.get("/bench/gc?collect=1&types=1")
            rec["objects_idle"] = g["objects"]
            nn = max(ev.get("open") or 1, 1)
            delta = {t: (c - types0.get(t, 0)) / nn for t, c in g.get("types", {}).items()}
            rec["types_per_conn"] = dict(sorted(delta.items(), key=lambda kv: -kv[1])[:15])
            rec["forced_collect_ms"] = g["forced_collect_ms"]
            st = srv.get("/bench/stats_time?n=50") if srv.spec.get("manager", True) else {}
            rec["get_stats_ms"] = st.get("median_ms")
            rec["get_stats_max_ms"] = st.get("max_ms")
            rec["get_stats_total"] = st.get("total_connections")
            if st:
                rec["http_stats"] = prober_result(run_prober(srv.port, "/api/v1/ws/stats", probe_s, 50))
        rec["http_health_idle"] = prober_result(run_prober(srv.port, "/health", probe_s / 2, 10))
        p.send_signal(signal.SIGTERM)

    ev = run_client(srv, ["-n", n, "--mode", "idle", "--hold", 300, *client], on_conn)
    cn = connected(ev)
    rec.update(connect_secs=cn.get("secs"), connect_rate=cn.get("rate"), hs_p99_ms=cn.get("hs_p99_ms"),
               open=cn.get("open"), failed=cn.get("failed"), deflate=cn.get("deflate"))
    time.sleep(1.5 * settle)
    rec["rss_after"] = srv.rss()
    if "rss_idle" in rec and cn.get("open"):
        rec["rss_per_conn"] = (rec["rss_idle"] - rec["rss_before"]) / cn["open"]
    if "objects_idle" in rec and cn.get("open"):
        rec["objects_per_conn"] = (rec["objects_idle"] - rec["objects_before"]) / cn["open"]
    log(f"  idle {srv.key} n={n}: connect {rec.get('connect_rate') or 0:.0f}/s, "
        f"RSS/conn {(rec.get('rss_per_conn') or 0) / 1024:.1f} KiB, objects/conn {rec.get('objects_per_conn')}, "
        f"get_stats {rec.get('get_stats_ms')} ms")
    return rec


def scen_closed(srv: Server, n: int, sizes: list[int], runs: int, duration: float,
                client: tuple[str, ...] = ()) -> dict:
    """`client`: more load-client options. RSS before, with the connections (before any message)
    and at the start of every phase (the connections still open, the previous phases' messages
    delivered)."""
    rec: dict[str, Any] = {"n": n, "rss_before": srv.rss(), "rss_phase_start": []}

    def on_conn(ev: dict, p: subprocess.Popen) -> None:
        rec["rss_with"] = srv.rss()

    def on_event(ev: dict, p: subprocess.Popen) -> None:
        if ev.get("event") == "phase_start":
            rec["rss_phase_start"].append(srv.rss())

    ev = run_client(srv, ["-n", n + 1, "--mode", "broadcast", "--sizes", ",".join(map(str, sizes)), "--runs", runs,
                          "--duration", duration, *client], on_conn,
                    timeout=120 + 3 * runs * len(sizes) * (duration + 15), on_event=on_event)
    time.sleep(1.0)
    rec["rss_after"] = srv.rss()
    rec["connected"] = connected(ev)
    rec["phases"] = phases(ev)
    for size in sizes:
        ph = [p for p in rec["phases"] if p["size"] == size]
        log(f"  closed {srv.key} n={n} size={size}: dps {median([p['dps'] for p in ph]) or 0:.0f}, "
            f"p99 {median([p['p99_ms'] for p in ph])} ms, cpu/deliv {median([p['cpu_us_per_delivery'] for p in ph])} us, "
            f"lost {sum(p['lost'] for p in ph)}")
    return rec


def scen_loop(srv: Server, n: int, runs: int, duration: float) -> list[dict]:
    """One set of n receivers; `runs` broadcast phases back to back, a prober inside each."""
    probers: list[subprocess.Popen] = []

    def on_event(ev: dict, p: subprocess.Popen) -> None:
        if ev.get("event") == "phase_start":
            time.sleep(0.2)
            probers.append(run_prober(srv.port, "/health", max(duration - 0.5, 0.5), 10))

    ev = run_client(srv, ["-n", n + 1, "--mode", "broadcast", "--sizes", 64, "--runs", runs, "--duration", duration],
                    timeout=180 + runs * (duration + 15), on_event=on_event)
    ph = phases(ev)
    out = []
    for r, pr in enumerate(probers):
        rec = {"n": n, "run": r, "http": prober_result(pr), "phases": ph[r:r + 1]}
        h = rec["http"] or {}
        log(f"  loop {srv.key} n={n} run {r}: HTTP p50 {h.get('p50_ms')} p99 {h.get('p99_ms')} max {h.get('max_ms')} ms; "
            f"dps {median([p['dps'] for p in rec['phases']]) or 0:.0f}")
        out.append(rec)
    return out


def scen_echo(srv: Server, n: int, runs: int, duration: float) -> list[dict]:
    ev = run_client(srv, ["-n", n, "--mode", "echo", "--sizes", 64, "--runs", runs, "--duration", duration],
                    timeout=120 + runs * (duration + 5))
    ph = phases(ev)
    log(f"  echo {srv.key}: {median([p['dps'] for p in ph]) or 0:.0f} round trips/s")
    return ph


def scen_chat(keys: list[str], rates: list[float], runs: int, duration: float, grace: float,
              receivers: int, senders: int) -> dict:
    servers = {k: Server(k).start() for k in keys}
    ramp: dict[str, list[dict]] = {k: [] for k in keys}
    alive = list(keys)
    try:
        for rate in rates:
            for k in list(alive):
                srv = servers[k]
                ev = run_client(srv, ["-n", receivers + senders, "--mode", "chat", "--senders", senders,
                                      "--rates", rate, "--runs", runs, "--duration", duration, "--grace", grace],
                                timeout=120 + runs * (duration + grace + 5))
                ph = phases(ev)
                ok = [p["lost"] == 0 and p["closed"] == 0 and 0 <= p["p99_ms"] < 250 for p in ph]
                passed = len(ph) == runs and sum(ok) * 2 > runs
                step = {"rate": rate, "offered_dps": rate * (receivers + senders - 1), "passed": passed,
                        "dps": median([p["dps"] for p in ph]), "p99_ms": median([p["p99_ms"] for p in ph]),
                        "lost": sum(p["lost"] for p in ph), "server_cpu_us_per_delivery":
                        median([p["cpu_us_per_delivery"] for p in ph]), "phases": ph}
                ramp[k].append(step)
                log(f"  chat {k} rate={rate:g} msg/s: dps {step['dps'] or 0:.0f}, p99 {step['p99_ms']} ms, "
                    f"lost {step['lost']}, {'pass' if passed else 'FAIL'}")
                if not passed:
                    alive.remove(k)
            if not alive:
                break
    finally:
        for s in servers.values():
            s.stop()
    sustained = {}
    for k, steps in ramp.items():
        good = [s for s in steps if s["passed"]]
        sustained[k] = {"rate": good[-1]["rate"], "dps": good[-1]["dps"], "p99_ms": good[-1]["p99_ms"]} if good else None
    return {"ramp": ramp, "sustained": sustained, "receivers": receivers, "senders": senders}


def scen_profile(key: str, n: int, size: int, duration: float) -> dict | None:
    """perf record (no call graphs) of the server during one closed-loop broadcast phase:
    where its CPU goes, by shared object and by symbol."""
    if not shutil.which("perf"):
        return None
    data = OUT / f"perf-{key}.data"
    srv = Server(key).start()
    holder: dict[str, subprocess.Popen] = {}

    def on_event(ev: dict, p: subprocess.Popen) -> None:
        if ev.get("event") == "phase_start" and "perf" not in holder:
            holder["perf"] = subprocess.Popen(["perf", "record", "-q", "-F", "499", "-p", str(srv.pid), "-o", str(data),
                                               "--", "sleep", str(max(duration - 0.3, 0.5))],
                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    try:
        ev = run_client(srv, ["-n", n + 1, "--mode", "broadcast", "--sizes", size, "--runs", 1, "--duration", duration],
                        timeout=300, on_event=on_event)
    finally:
        if "perf" in holder:
            holder["perf"].wait(60)
        srv.stop()
    if not data.exists():
        return None

    def report(sort: str, limit: int) -> list[str]:
        r = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", sort,
                            "--percent-limit", "0.7"], capture_output=True, text=True)
        return [ln.rstrip() for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")][:limit]

    out = {"key": key, "n": n, "size": size, "phases": phases(ev), "by_dso": report("dso", 12),
           "by_symbol": report("dso,sym", 30)}
    data.unlink(missing_ok=True)
    ph = out["phases"][0] if out["phases"] else {}
    log(f"  profile {key}: {ph.get('cpu_us_per_delivery')} us/delivery; top: {out['by_dso'][:3]}")
    return out


# where the Python thread's time goes (py-spy), sorted into the layers a request crosses; py-spy
# names a frame "function (package/module.py:line)"
PY_LAYERS = [("wsmanager", ("wsmanager/",)), ("endpoint code (examples/seed_endpoint)", ("examples/",)),
             ("FastAPI / Starlette / pydantic", ("fastapi/", "starlette/", "pydantic", "annotated_doc")),
             ("uvicorn HTTP parsing (h11) before the upgrade", ("h11/", "uvicorn/protocols/http/")),
             ("uvicorn (other)", ("uvicorn/",)), ("websockets library", ("websockets/",)),
             ("asyncio / uvloop", ("asyncio/", "uvloop", "loop.c", "_asynciomodule"))]


def layer_of(frames: list[str]) -> str:
    """The layer of the innermost frame that belongs to one (stdlib helpers such as json count
    for their caller)."""
    for frame in reversed(frames):
        path = frame[frame.rfind("(") + 1:]
        for name, marks in PY_LAYERS:
            if path.startswith(marks) or any("/" + m in path for m in marks):
                return name
    return "other (stdlib, interpreter)"


def scen_pyprofile(key: str, mode: str, n: int, duration: float) -> dict | None:
    """py-spy record of the server's Python thread during a connect ramp (mode "connect": n
    connections opened) or an echo phase; samples are charged to the layer of their innermost
    frame, and the functions with the largest inclusive share are listed."""
    spy = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")
    if not spy:
        return None
    raw = OUT / f"pyspy-{key}-{mode}.txt"
    srv = Server(key).start()
    holder: dict[str, subprocess.Popen] = {}

    def start_spy(secs: float) -> None:
        holder["spy"] = subprocess.Popen([spy, "record", "-p", str(srv.pid), "-d", str(max(int(secs), 1)), "-r", "200",
                                          "-f", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)

    def on_event(ev: dict, p: subprocess.Popen) -> None:
        if mode == "echo" and ev.get("event") == "phase_start" and "spy" not in holder:
            start_spy(duration - 0.5)

    try:
        if mode == "connect":
            threading.Timer(0.3, start_spy, args=(3,)).start()
            ev = run_client(srv, ["-n", n, "--mode", "idle", "--hold", 1], timeout=300)
        else:
            ev = run_client(srv, ["-n", n, "--mode", "echo", "--sizes", 64, "--runs", 1, "--duration", duration],
                            timeout=300, on_event=on_event)
    finally:
        time.sleep(0.5)
        if "spy" in holder:
            holder["spy"].wait(60)
        srv.stop()
    if not raw.exists():
        return None
    layers: dict[str, int] = {}
    incl: dict[str, int] = {}
    ours: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, c = stack.split(";"), int(count)
        total += c
        layer = layer_of(frames)
        layers[layer] = layers.get(layer, 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
        for f in {f.rsplit(":", 1)[0] + ")" for f in frames if " (wsmanager/" in f}:
            if not f.startswith("WebSocketProtocol.run_asgi"):
                ours[f] = ours.get(f, 0) + c
    raw.unlink(missing_ok=True)
    if not total:
        return None
    conn = next((e for e in ev if e.get("event") == "connected"), {})
    ph = phases(ev)
    out = {"key": key, "mode": mode, "n": n, "samples": total,
           "rate": conn.get("rate") if mode == "connect" else (ph[0]["dps"] if ph else None),
           "layers": sorted(((k, v / total) for k, v in layers.items()), key=lambda kv: -kv[1]),
           "inclusive": [(f, v / total) for f, v in sorted(incl.items(), key=lambda kv: -kv[1])
                         if not f.startswith(("<module>", "Command.", "Context.", "main ", "run ", "asyncio_run",
                                              "Runner.run", "Server.run", "Loop__run", "run_forever", "_run_code",
                                              "_run_module_as_main"))][:12],
           # wsmanager's own functions (lines merged), without run_asgi (which contains the whole app)
           "ours": sorted(((f, v / total) for f, v in ours.items()), key=lambda kv: -kv[1])[:12]}
    log(f"  py-spy {key} {mode}: " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in out["layers"][:4]))
    return out


SWEEP_CODE = r"""
import json, statistics, sys, threading, time
from datetime import datetime, timedelta
from wsmanager import _core

N = int(sys.argv[1]); RUNS = int(sys.argv[2])
sys.setswitchinterval(0.0001)

def build():
    r = _core.Registry(capacity=N, stale_after=30.0)
    t0 = time.perf_counter()
    for i in range(N):
        h = r.add(f"c{i}", f"u{i}")
        r.set_state(h, _core.STATE_OPEN)
    return r, time.perf_counter() - t0

def timed(r, now):
    stall = {"max": 0.0}
    stop = threading.Event()
    def spin():
        last = time.perf_counter()
        while not stop.is_set():
            t = time.perf_counter()
            stall["max"] = max(stall["max"], t - last)
            last = t
    th = threading.Thread(target=spin); th.start(); time.sleep(0.02)
    stall["max"] = 0.0
    t0 = time.perf_counter_ns()
    got = r.sweep(now, max=N + 1)
    dt = (time.perf_counter_ns() - t0) / 1e6
    stop.set(); th.join()
    return dt, len(got), stall["max"] * 1000

res = {"n": N, "none_due_ms": [], "all_due_ms": [], "all_due_count": [], "stall_all_due_ms": [], "add_s": []}
for _ in range(RUNS):
    r, add_s = build()
    res["add_s"].append(add_s)
    now = _core.monotonic_ns()
    dt, cnt, _ = timed(r, now)
    res["none_due_ms"].append(dt)
    dt, cnt, stall = timed(r, now + 3600 * 10**9)
    res["all_due_ms"].append(dt); res["all_due_count"].append(cnt); res["stall_all_due_ms"].append(stall)
    del r

# the seed's stale check (_send_pings without the sends) over N ConnectionInfo objects
sys.path.insert(0, sys.argv[3])
from benchmarks.reference_app import ConnectionInfo
now = datetime.now()
active = {f"c{i}": object() for i in range(N)}
infos = {f"c{i}": ConnectionInfo(connection_id=f"c{i}", user_id=f"u{i}", connected_at=now, last_ping=now) for i in range(N)}
ref = []
for _ in range(RUNS):
    t0 = time.perf_counter()
    dead = []
    for cid, ws in list(active.items()):
        info = infos.get(cid)
        if not info:
            continue
        if now - info.last_ping > timedelta(seconds=20):
            dead.append(cid)
    ref.append((time.perf_counter() - t0) * 1000)
res["ref_check_ms"] = ref
print(json.dumps(res))
"""


def scen_sweep(n: int, runs: int) -> dict | None:
    r = subprocess.run([PY, "-c", SWEEP_CODE, str(n), str(runs), str(ROOT)], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    if r.returncode:
        log(f"  sweep failed: {r.stderr.strip()[-300:]}")
        return None
    res = json.loads(r.stdout)
    log(f"  sweep n={n}: none due {median(res['none_due_ms']):.3f} ms, all due {median(res['all_due_ms']):.2f} ms "
        f"(stall {median(res['stall_all_due_ms']):.2f} ms), seed check {median(res['ref_check_ms']):.1f} ms")
    return res


# the density scenario's servers, in the order their idle cycles run (the floor has none)
DENSITY_KEYS = ("floor-onesend", "ref", "wsm-native", "wsm-detached")
# scenarios with a section of their own in raw.json and RESULTS.md (see main())
SECTIONS = ("density", "deflate")
# descriptors a server or the load client needs beyond one per connection (stdio, listening
# socket, epoll, eventfds, log file, /proc reads): N + 1 connections (the broadcast's sender)
# and these must fit under RLIMIT_NOFILE's hard limit in each of the two processes
FD_SPARE = 64


def wait_fds(srv: Server, limit: int, timeout: float = 60) -> int:
    """Waits until the server holds at most `limit` descriptors, or a count that has not changed
    for a second (an engine opens its own epoll and eventfds at the first connection): the
    connections of a client that left are closed, and the next client's N + 1 fit beside them."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while (n := proc_fds(srv.pid)) > limit and time.monotonic() < deadline:
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= 1.0:
            break
        time.sleep(0.1)
    return n


def scen_density(D: dict, P: dict, save: Callable[[], None]) -> dict:
    """For each N: every Python server started afresh and its idle cycle run alone (RSS,
    objects, gen-2 pauses, get_stats(), connect rate at N), the server kept up; then
    closed-loop broadcasts (64 B) from one sender to all N, interleaved over the servers and the
    one-send floor round by round. Every server is stopped before the next N. Fills D
    ({"ns", "keys", "idle": {}, "closed": {}}) as it goes, so that every save() has the figures so far."""
    keys = D["keys"]
    for n in D["ns"]:
        servers: dict[str, Server] = {}
        try:
            base_fds: dict[str, int] = {}
            for key in keys:
                cycles = P["density_cycles"] if SERVERS[key].get("app") else 1
                for c in range(cycles):  # each cycle on a fresh server; the last one stays up
                    if key in servers:
                        servers.pop(key).stop()
                    srv = servers[key] = Server(key).start()
                    base_fds[key] = proc_fds(srv.pid)
                    if not srv.is_py:
                        continue
                    log(f"== density n={n}: idle {key}, cycle {c + 1}/{cycles}")
                    rec = _idle_cycle(srv, n, c, P["probe_s"], P["density_settle"])
                    rec["base_fds"] = base_fds[key]
                    rec["fds_drained"] = wait_fds(srv, base_fds[key] + 8)
                    D["idle"].setdefault(key, []).append(rec)
                    save()
            for r in range(P["density_rounds"]):
                log(f"== density n={n}: broadcast round {r + 1}/{P['density_rounds']}")
                for key in keys:
                    rec = scen_closed(servers[key], n, [64], 1, P["duration"])
                    recs = D["closed"].setdefault(key, [])
                    old = next((x for x in recs if x["n"] == n), None)
                    if old is None:
                        recs.append(rec)
                    else:
                        old["phases"].extend(rec["phases"])
                    wait_fds(servers[key], base_fds[key] + 8)
                save()
        finally:
            for srv in servers.values():
                srv.stop()
    return D


# the compressed-broadcast scenario: (variant, server, the receivers offer permessage-deflate)
DEFLATE_VARIANTS = (("native-z", "wsm-native", True), ("native-plain", "wsm-native", False),
                    ("stock-z", "ref", True), ("stock-plain", "ref", False))
DEFLATE_LABELS = {"native-z": "native plane, compressed", "native-plain": "native plane, uncompressed",
                  "stock-z": "seed manager, stock uvicorn, compressed", "stock-plain": "seed manager, stock uvicorn, uncompressed"}


# every 10th receiver inflates (and checks order and content); the others count compressed
# frames as deliveries: 1 000 zlib windows in the load client (40 MB) crowd the server out of the
# two cores' shared caches (measured, 1 000 receivers of 9 KB: native compressed at 1.52x native
# uncompressed server CPU per delivery with every receiver inflating, at fab9d1c with up to a core
# of other load; 0.90x with every 10th, at 1a1e1af, on a quiet machine)
DEFLATE_INFLATE_EVERY = 10


def deflate_client(offer: bool) -> tuple[str, ...]:
    return ("--filler", "text", "--deflate", "1" if offer else "0", "--inflate-every", str(DEFLATE_INFLATE_EVERY))


def scen_deflate(D: dict, P: dict, save: Callable[[], None]) -> dict:
    """Closed-loop broadcasts of P["deflate_sizes"] to P["deflate_n"] receivers, every variant
    of DEFLATE_VARIANTS in turn on one process per server (P["deflate_rounds"] rounds,
    interleaved), then the idle cycles (P["deflate_idle_n"] connections, P["deflate_cycles"]
    cycles, each on a fresh server). Fills D ({"closed": {}, "idle": {}}) as it goes."""
    variants = [v for v in DEFLATE_VARIANTS if v[0] in D["variants"]]
    keys = sorted({key for _, key, _ in variants})
    servers: dict[str, Server] = {}
    try:
        for key in keys:
            servers[key] = Server(key).start()
        for r in range(P["deflate_rounds"]):
            log(f"== deflate: broadcast round {r + 1}/{P['deflate_rounds']}")
            for name, key, offer in variants:
                rec = scen_closed(servers[key], P["deflate_n"], P["deflate_sizes"], 1, P["duration"],
                                  deflate_client(offer))
                rec["round"] = r
                D["closed"].setdefault(name, []).append(rec)
                for ph in rec["phases"]:
                    log(f"  {name} size={ph['size']}: {ph['rx_bytes'] / max(ph['deliveries'], 1):.0f} B/delivery "
                        f"on the wire, {ph['compressed']} of {ph['deliveries']} compressed, {ph['inflated']} inflated")
                save()
    finally:
        for srv in servers.values():
            srv.stop()
    for name, key, offer in variants:
        for c in range(P["deflate_cycles"]):
            srv = Server(key).start()
            try:
                log(f"== deflate: idle {name}, cycle {c + 1}/{P['deflate_cycles']}")
                D["idle"].setdefault(name, []).append(
                    _idle_cycle(srv, P["deflate_idle_n"], c, P["probe_s"], P["density_settle"], deflate_client(offer)))
            finally:
                srv.stop()
            save()
    return D


def one_round(name: str, srv: Server, res: dict, P: dict) -> None:
    """One run of scenario `name` on one server, merged into that server's results."""
    if name == "closed":
        recs = res.setdefault("closed", [])
        for n in P["closed_ns"]:
            rec = scen_closed(srv, n, P["sizes"], 1, P["duration"])
            old = next((r for r in recs if r["n"] == n), None)
            if old is None:
                recs.append(rec)
            else:  # RSS figures stay those of the first round
                old["phases"].extend(rec["phases"])
    elif name == "loop":
        loop = res.setdefault("loop", [])
        for rec in scen_loop(srv, P["loop_n"], 1, P["loop_duration"]):
            rec["run"] = len(loop)
            loop.append(rec)
    else:
        res.setdefault("echo", []).extend(scen_echo(srv, P["echo_n"], 1, P["echo_duration"]))


# ---------------------------------------------------------------------------------------------
# machine facts


def machine() -> dict:
    def cmd(*a: str) -> str:
        with contextlib.suppress(Exception):
            return subprocess.run(a, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return ""

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    pkgs = {}
    for p in ("uvicorn", "fastapi", "starlette", "pydantic", "websockets", "wsproto", "h11", "httptools", "uvloop",
              "wsmanager", "matplotlib"):
        try:
            pkgs[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pkgs[p] = "not installed"
    rev = cmd("git", "rev-parse", "--short", "HEAD")
    dirty = cmd("git", "status", "--porcelain", "--", "wsmanager", "csrc")
    return {"cores": os.cpu_count(), "cpu": cpu, "memory": mem, "kernel": platform.release(),
            "os": cmd("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"), "python": platform.python_version(),
            "gcc": cmd("gcc", "-dumpfullversion"), "packages": pkgs,
            "git": rev + (" + uncommitted changes in wsmanager/ csrc/" if dirty else ""),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


# ---------------------------------------------------------------------------------------------
# report


def fmt(x: Any, nd: int = 0, unit: str = "") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if nd == 0 and abs(x) >= 100:
            return f"{x:,.0f}{unit}"
        return f"{x:,.{nd}f}{unit}"
    return f"{x:,}{unit}" if isinstance(x, int) else f"{x}{unit}"


def ratio(a: float | None, b: float | None, nd: int = 2) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.{nd}f}×"


def summarize(R: dict) -> dict:
    """Medians per server and scenario."""
    S: dict[str, Any] = {"closed": {}, "idle": {}, "loop": {}, "echo": {}, "connect": {}}
    for key, res in R["servers"].items():
        for rec in res.get("closed", []):
            for size in sorted({p["size"] for p in rec["phases"]}):
                ph = [p for p in rec["phases"] if p["size"] == size]
                S["closed"].setdefault((rec["n"], size), {})[key] = {
                    "dps": median([p["dps"] for p in ph]), "p50": median([p["p50_ms"] for p in ph]),
                    "p99": median([p["p99_ms"] for p in ph]), "cpu_us": median([p["cpu_us_per_delivery"] for p in ph]),
                    "client_cpu": median([p["client_cpu"] / p["secs"] for p in ph]),
                    "other_cpu": median([p["other_cpu"] / p["secs"] for p in ph]),
                    "server_cpu": median([p["server_cpu"] / p["secs"] for p in ph]),
                    "lost": sum(p["lost"] for p in ph), "dup": sum(p["dup"] for p in ph),
                    "ooo": sum(p["ooo"] for p in ph), "runs": len(ph), "msgs": median([p["msgs"] for p in ph]),
                    "rss_before": rec.get("rss_before"), "rss_with": rec.get("rss_with"), "rss_after": rec.get("rss_after")}
        idle = res.get("idle", [])
        if idle:
            def m(k: str) -> float | None:
                return median([c.get(k) for c in idle if c.get(k) is not None])
            S["idle"][key] = {k: m(k) for k in ("rss_per_conn", "objects_per_conn", "gen2_natural_max_ms",
                                                "forced_collect_ms", "get_stats_ms", "connect_rate", "hs_p99_ms",
                                                "rss_before", "rss_idle", "rss_after")}
            S["idle"][key]["n"] = idle[0]["n"]
            S["idle"][key]["http_stats_p50"] = median([(c.get("http_stats") or {}).get("p50_ms") for c in idle])
            S["idle"][key]["http_stats_p99"] = median([(c.get("http_stats") or {}).get("p99_ms") for c in idle])
            S["idle"][key]["http_health_p99"] = median([(c.get("http_health_idle") or {}).get("p99_ms") for c in idle])
            S["idle"][key]["failed"] = sum(c.get("failed") or 0 for c in idle)
        if res.get("idle_5k"):
            i5 = res["idle_5k"]
            hk = f"{key}@{i5[0]['n']}"
            S["idle"][hk] = {k: median([c.get(k) for c in i5 if c.get(k) is not None]) for k in (
                "rss_per_conn", "objects_per_conn", "gen2_natural_max_ms", "forced_collect_ms", "get_stats_ms",
                "connect_rate", "hs_p99_ms", "rss_before", "rss_idle", "rss_after")}
            S["idle"][hk]["n"] = i5[0]["n"]
        loop = res.get("loop", [])
        if loop:
            S["loop"][key] = {"p50": median([(r["http"] or {}).get("p50_ms") for r in loop]),
                              "p99": median([(r["http"] or {}).get("p99_ms") for r in loop]),
                              "max": median([(r["http"] or {}).get("max_ms") for r in loop]),
                              "co_p99": median([(r["http"] or {}).get("co_p99_ms") for r in loop]),
                              "dps": median([p["dps"] for r in loop for p in r["phases"]]),
                              "bc_p99": median([p["p99_ms"] for r in loop for p in r["phases"]]),
                              "n": loop[0]["n"], "runs": len(loop)}
        echo = res.get("echo", [])
        if echo:
            S["echo"][key] = {"rps": median([p["dps"] for p in echo]), "p50": median([p["p50_ms"] for p in echo]),
                              "p99": median([p["p99_ms"] for p in echo]),
                              "cpu_us": median([p["server_cpu"] / p["deliveries"] * 1e6 for p in echo if p["deliveries"]]),
                              "runs": len(echo)}
    return S


def fit_line(pts: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope) through (x, y) points; None below two distinct x."""
    pts = [(x, y) for x, y in pts if x is not None and y is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return my - b * mx, b


EXTRAPOLATE = (100_000, 1_000_000)


def _median_cycle(cycles: list[dict]) -> dict | None:
    """One record from the idle cycles at one N: the median of every number (the kernel figures
    and the object types from the last cycle)."""
    if not cycles:
        return None
    cycles = [dict(c) for c in cycles]
    for c in cycles:  # the differences per cycle, then their median
        if "rss_idle" in c:
            c["rss_delta"] = c["rss_idle"] - c["rss_before"]
        if "objects_idle" in c:
            c["objects_delta"] = c["objects_idle"] - c["objects_before"]
        c["gen2_max_ms"] = max(c.get("gen2_natural_max_ms") or 0, c.get("forced_collect_ms") or 0)
    out = dict(cycles[-1])
    for k, v in cycles[-1].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = median([c.get(k) for c in cycles])
    out["cycles"] = len(cycles)
    return out


def density_summary(D: dict) -> dict:
    """Per server: one row per N (N-averaged per-connection figures, the broadcast's medians and
    its ratio to the floor at the same N), the slopes between the N values (consecutive pairs
    and the least-squares fit over all), and RSS / gen-2 pause extrapolated from the fit."""
    floor = {rec["n"]: rec for rec in D["closed"].get("floor-onesend", [])}

    def bc(rec: dict | None) -> dict:
        ph = (rec or {}).get("phases") or []
        return {"dps": median([p["dps"] for p in ph]), "cpu_us": median([p["cpu_us_per_delivery"] for p in ph]),
                "p99": median([p["p99_ms"] for p in ph]), "lost": sum(p["lost"] for p in ph),
                "dup": sum(p["dup"] for p in ph), "ooo": sum(p["ooo"] for p in ph), "runs": len(ph),
                "msgs": sum(p["msgs"] for p in ph), "deliveries": sum(p["deliveries"] for p in ph),
                "receivers": (rec or {}).get("connected", {}).get("open")}

    out: dict[str, Any] = {}
    for key in D["keys"]:
        closed = {rec["n"]: rec for rec in D["closed"].get(key, [])}
        rows = []
        for n in D["ns"]:
            idle = _median_cycle([r for r in D["idle"].get(key, []) if r["n"] == n])
            row: dict[str, Any] = {"n": n, "bc": bc(closed.get(n)), "floor": bc(floor.get(n))}
            if row["bc"]["cpu_us"] and row["floor"]["cpu_us"]:
                row["bc_ratio"] = row["bc"]["cpu_us"] / row["floor"]["cpu_us"]
            if idle:
                o = idle.get("open") or 0
                kb, ki = idle.get("kernel_before") or {}, idle.get("kernel_idle") or {}
                row.update({k: idle.get(k) for k in ("open", "failed", "connect_rate", "hs_p99_ms", "rss_before",
                                                     "rss_idle", "rss_per_conn", "objects_before", "objects_idle",
                                                     "objects_per_conn", "gen2_natural_max_ms", "gen2_count",
                                                     "forced_collect_ms", "get_stats_ms", "get_stats_max_ms",
                                                     "fds_idle", "types_per_conn")})
                row.update({k: idle.get(k) for k in ("gen2_max_ms", "rss_delta", "objects_delta", "cycles")})
                # loopback: both ends of every connection are this machine's sockets
                if o and "slab" in kb and "slab" in ki:
                    row["kernel_slab_per_socket"] = (ki["slab"] - kb["slab"]) / (2 * o)
                if o and "tcp_mem" in kb and "tcp_mem" in ki:
                    row["kernel_tcp_mem_per_socket"] = (ki["tcp_mem"] - kb["tcp_mem"]) / (2 * o)
            rows.append(row)
        measured = [r for r in rows if r.get("open")]
        slopes: dict[str, Any] = {"pairs": []}
        for a, b in zip(measured, measured[1:]):
            dn = b["open"] - a["open"]
            if dn <= 0:
                continue
            pair = {"from": a["n"], "to": b["n"]}
            for k in ("rss_delta", "objects_delta", "gen2_max_ms", "forced_collect_ms", "get_stats_ms"):
                if a.get(k) is not None and b.get(k) is not None:
                    pair[k] = (b[k] - a[k]) / dn
            slopes["pairs"].append(pair)
        for k in ("rss_delta", "objects_delta", "gen2_max_ms", "forced_collect_ms", "get_stats_ms", "rss_idle"):
            f = fit_line([(r["open"], r.get(k)) for r in measured])
            if f:
                slopes[k] = {"intercept": f[0], "slope": f[1]}
        extra = {}
        if "rss_idle" in slopes:
            f = slopes["rss_idle"]
            extra["rss"] = {str(n): f["intercept"] + f["slope"] * n for n in EXTRAPOLATE}
        if "gen2_max_ms" in slopes:
            f = slopes["gen2_max_ms"]
            top = measured[-1]["gen2_max_ms"]  # a slope lost in the noise: flat, the largest N's pause
            extra["gen2_ms"] = {str(n): f["intercept"] + f["slope"] * n if f["slope"] > 0 else top for n in EXTRAPOLATE}
        if "objects_delta" in slopes:
            f = slopes["objects_delta"]
            extra["objects"] = {str(n): f["intercept"] + f["slope"] * n for n in EXTRAPOLATE}
        out[key] = {"rows": rows, "slopes": slopes, "extrapolated": extra}
    return out


def _log_axes(axes, xlabel: str) -> None:
    """Log-log scales, the x label, grid and legend shared by the line charts."""
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)


def _save_chart(plt, fig, name: str, files: list[str]) -> None:
    """Lay out, write CHARTS/name, close the figure and record it in files."""
    fig.tight_layout()
    fig.savefig(CHARTS / name, dpi=90)
    plt.close(fig)
    files.append(f"charts/{name}")


def write_charts(R: dict, S: dict) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is missing: installing it into this Python's environment for the charts")
        subprocess.run([PY, "-m", "pip", "install", "-q", "matplotlib"])
        try:
            import matplotlib
        except ImportError:
            log("matplotlib unavailable: no charts")
            return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    CHARTS.mkdir(exist_ok=True)
    files = []
    keys = list(SERVERS)
    # deliveries/s and p99 fan-out against receivers
    sizes = sorted({s for (_, s) in S["closed"]})
    if sizes:
        fig, axes = plt.subplots(2, len(sizes), figsize=(6 * len(sizes), 8), squeeze=False)
        for j, size in enumerate(sizes):
            for key in keys:
                pts = sorted((n, v[key]) for (n, s), v in S["closed"].items() if s == size and key in v)
                if not pts:
                    continue
                ns = [n for n, _ in pts]
                axes[0][j].plot(ns, [v["dps"] for _, v in pts], "o-", label=key)
                axes[1][j].plot(ns, [v["p99"] for _, v in pts], "o-", label=key)
            axes[0][j].set_title(f"closed-loop broadcast, {size} B: deliveries/s")
            axes[1][j].set_title(f"closed-loop broadcast, {size} B: p99 fan-out time (ms)")
            _log_axes((axes[0][j], axes[1][j]), "receivers")
        _save_chart(plt, fig, "closed_loop.png", files)
    chat = R.get("chat")
    if chat:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for key, steps in chat["ramp"].items():
            if not steps:
                continue
            x = [s["offered_dps"] for s in steps]
            axes[0].plot(x, [s["dps"] or 0 for s in steps], "o-", label=key)
            axes[1].plot(x, [max(s["p99_ms"] or 0, 0.01) for s in steps], "o-", label=key)
        axes[0].plot([1e4, 1e7], [1e4, 1e7], "k:", lw=0.8, label="offered")
        axes[0].set_title("chat ramp: delivered/s vs offered deliveries/s")
        axes[1].set_title("chat ramp: p99 delivery-to-all (ms) vs offered deliveries/s")
        axes[1].axhline(250, color="r", ls="--", lw=0.8)
        _log_axes(axes, "offered deliveries/s")
        _save_chart(plt, fig, "chat_ramp.png", files)
    if S["closed"]:
        combos = sorted(S["closed"])
        fig, ax = plt.subplots(figsize=(12, 4.5))
        keys = [k for k in keys if any(k in v for v in S["closed"].values())]
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            ys = [S["closed"][c].get(key, {}).get("cpu_us") or 0 for c in combos]
            ax.bar([j + i * width for j in range(len(combos))], ys, width, label=key)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(combos))])
        ax.set_xticklabels([f"{n} recv, {s} B" for n, s in combos])
        ax.set_ylabel("server CPU µs per delivery")
        ax.set_yscale("log")
        ax.set_title("closed-loop broadcast: server CPU per delivery")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
        _save_chart(plt, fig, "cpu_per_delivery.png", files)
    if R.get("density"):
        density_chart(plt, R, files)
    return files


def targets(R: dict, S: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the native plane."""
    out = []
    nat = "wsm-native"
    for (n, size), v in sorted(S["closed"].items()):
        if nat in v and "floor-onesend" in v:
            a, f = v[nat], v["floor-onesend"]
            if a["cpu_us"] and f["cpu_us"]:
                r = a["cpu_us"] / f["cpu_us"]
                out.append((f"closed {n}×{size} B: CPU/delivery ≤ 1.25× one-send floor",
                            f"{a['cpu_us']:.2f} vs {f['cpu_us']:.2f} µs = {r:.2f}×",
                            "met" if r <= 1.25 else f"missed by {r / 1.25:.2f}×"))
            if a["dps"] and f["dps"]:
                r = a["dps"] / f["dps"]
                out.append((f"closed {n}×{size} B: deliveries/s ≥ 80% of one-send floor",
                            f"{a['dps']:,.0f} vs {f['dps']:,.0f} = {r * 100:.0f}%",
                            "met" if r >= 0.8 else f"missed ({r * 100:.0f}% < 80%)"))
    chat = R.get("chat")
    if chat:
        sus = chat["sustained"]
        n, ref, co = sus.get(nat), sus.get("ref"), sus.get("floor-coalesce")
        if n and ref:
            r = n["dps"] / ref["dps"]
            out.append(("chat: sustained ≥ 30× reference", f"{n['dps']:,.0f} vs {ref['dps']:,.0f} = {r:.1f}×",
                        "met" if r >= 30 else f"missed ({r:.1f}× < 30×)"))
        if n and co:
            r = n["dps"] / co["dps"]
            top = max(chat["ramp"]["floor-coalesce"], key=lambda s: s["rate"])
            capped = " (the coalescing floor passed the ramp's top rate: its figure is a lower bound)" \
                if top["passed"] else ""
            out.append(("chat: sustained ≥ 40% of coalescing floor",
                        f"{n['dps']:,.0f} vs {co['dps']:,.0f} = {r * 100:.0f}%{capped}",
                        "met" if r >= 0.4 else f"missed ({r * 100:.0f}% < 40%)"))
        elif sus.get(nat) is None and nat in chat["ramp"]:
            out.append(("chat: sustained", "native failed the lowest rate", "missed"))
    lp = S["loop"].get(nat)
    if lp and lp["p99"] is not None:
        out.append((f"HTTP p99 ≤ 5 ms during broadcasts to {lp['n']}", f"{lp['p99']:.2f} ms",
                    "met" if lp["p99"] <= 5 else f"missed by {lp['p99'] / 5:.2f}×"))
    idl = S["idle"].get(nat)
    if idl:
        n = idl["n"]
        if idl.get("get_stats_ms") is not None:
            out.append((f"get_stats() at {n} ≤ 1 ms (in-process)", f"{idl['get_stats_ms']:.3f} ms",
                        "met" if idl["get_stats_ms"] <= 1 else f"missed by {idl['get_stats_ms']:.1f}×"))
        if idl.get("rss_per_conn") is not None:
            kib = idl["rss_per_conn"] / 1024
            out.append((f"RSS per idle connection at {n} ≤ 16 KiB", f"{kib:.1f} KiB",
                        "met" if kib <= 16 else f"missed by {kib / 16:.2f}×"))
        if idl.get("objects_per_conn") is not None:
            o = idl["objects_per_conn"]
            out.append((f"GC-tracked objects per idle connection at {n} ≤ 30", f"{o:.1f}",
                        "met" if o <= 30 else f"missed by {o / 30:.2f}×"))
        ref5 = next((v for k, v in S["idle"].items() if k.startswith("ref@")), None) or S["idle"].get("ref")
        if ref5 and idl.get("forced_collect_ms") is not None and ref5.get("forced_collect_ms"):
            a = max(idl.get("gen2_natural_max_ms") or 0, idl["forced_collect_ms"])
            b = max(ref5.get("gen2_natural_max_ms") or 0, ref5["forced_collect_ms"])
            out.append((f"longest gen-2 pause at {n} ≤ 1/5 of the reference's at {ref5['n']}",
                        f"{a:.1f} ms vs {b:.1f} ms = 1/{b / a:.1f}" if a else f"{a} vs {b}",
                        "met" if a * 5 <= b else f"missed ({a / b:.2f} of it > 0.20)"))
    sw = R.get("sweep")
    if sw:
        t = median(sw["none_due_ms"])
        out.append((f"sweep over {sw['n']:,} registered, none due, < 5 ms", f"{t:.3f} ms",
                    "met" if t < 5 else f"missed by {t / 5:.1f}×"))
        t = median(sw["all_due_ms"])
        out.append((f"sweep over {sw['n']:,} registered, all due, < 5 ms", f"{t:.2f} ms "
                    f"(a spinning Python thread stalled ≤ {median(sw['stall_all_due_ms']):.2f} ms)",
                    "met" if t < 5 else f"missed by {t / 5:.1f}×"))
    for ref_key in ("ref", "wsm-portable"):
        a, b = S["echo"].get(nat), S["echo"].get(ref_key)
        if a and b:
            r = a["rps"] / b["rps"]
            out.append((f"echo round trips/s ≥ 2× stock uvicorn ({ref_key})", f"{a['rps']:,.0f} vs {b['rps']:,.0f} = {r:.2f}×",
                        "met" if r >= 2 else f"missed ({r:.2f}×)"))
        a, b = S["idle"].get(nat), S["idle"].get(ref_key)
        if a and b and a.get("connect_rate") and b.get("connect_rate"):
            r = a["connect_rate"] / b["connect_rate"]
            out.append((f"connect+handshake rate ≥ 2× stock uvicorn ({ref_key})",
                        f"{a['connect_rate']:,.0f}/s vs {b['connect_rate']:,.0f}/s = {r:.2f}×",
                        "met" if r >= 2 else f"missed ({r:.2f}×)"))
    return out


def targets_table(w: Callable[[str], None], title: str, T: list[tuple[str, str, str]]) -> None:
    """A (target, measured, verdict) table under its title; nothing without targets."""
    if not T:
        return
    w(title + "\n")
    w("| target | measured | verdict |\n|---|---|---|")
    for t, m, v in T:
        w(f"| {t} | {m} | {'✅ ' if v == 'met' else '❌ '}{v} |")
    w("")


def kib(b: float | None) -> float | None:
    return None if b is None else b / 1024


def human_bytes(b: float | None) -> str:
    if b is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(b) >= size:
            return f"{b / size:,.1f} {unit}"
    return f"{b / 1024:,.0f} KiB"


def human_ms(ms: float | None) -> str:
    if ms is None:
        return "–"
    return f"{ms / 1000:,.2f} s" if ms >= 1000 else f"{ms:,.1f} ms"


def density_targets(DS: dict) -> list[tuple[str, str, str]]:
    """Issue 14's targets, from the largest N measured."""
    out: list[tuple[str, str, str]] = []

    def verdict(ok: bool, miss: str) -> str:
        return "met" if ok else miss

    det = DS.get("wsm-detached")
    if det:
        rows = [r for r in det["rows"] if r.get("open")]
        if rows:
            top = rows[-1]
            n = top["n"]
            rpc, opc = kib(top.get("rss_per_conn")), top.get("objects_per_conn")
            sl = det["slopes"]
            srss = kib(sl.get("rss_delta", {}).get("slope"))
            sobj = sl.get("objects_delta", {}).get("slope")
            if rpc is not None:
                worst = max(rpc, srss if srss is not None else rpc)
                out.append((f"detached at {n:,}: ≤ 4 KiB RSS per connection (N-averaged and slope)",
                            f"{rpc:.2f} KiB averaged, {fmt(srss, 2)} KiB slope",
                            verdict(worst <= 4, f"missed by {worst / 4:.2f}× (the wslay contexts: a C change)")))
            if opc is not None:
                worst = max(opc, sobj if sobj is not None else opc)
                out.append((f"detached at {n:,}: ≤ 2 GC-tracked objects per connection (N-averaged and slope)",
                            f"{opc:.2f} averaged, {fmt(sobj, 2)} slope",
                            verdict(worst <= 2, f"missed by {worst / 2:.2f}×")))
            g = top.get("gen2_max_ms")
            if g is not None:
                fit = sl.get("gen2_max_ms")
                share = (f"; fit: {fit['intercept']:.1f} ms at N = 0 (the app's own objects) + "
                         f"{fit['slope'] * n:.1f} ms for the {n:,} connections") if fit else ""
                out.append((f"detached at {n:,}: longest gen-2 pause ≤ 20 ms (natural or one forced gc.collect())",
                            f"{g:.1f} ms (natural {fmt(top.get('gen2_natural_max_ms'), 1)}, "
                            f"forced {fmt(top.get('forced_collect_ms'), 1)}{share})",
                            verdict(g <= 20, f"missed by {g / 20:.2f}×")))
            t = top.get("get_stats_ms")
            if t is not None:
                out.append((f"detached at {n:,}: get_stats() ≤ 1 ms", f"{t:.3f} ms",
                            verdict(t <= 1, f"missed by {t:.1f}×")))
    for key in ("wsm-detached", "wsm-native"):
        x = DS.get(key)
        if not x:
            continue
        row = next((r for r in reversed(x["rows"]) if r.get("bc_ratio")), None)
        if row:
            lost = row["bc"]["lost"] + row["bc"]["dup"] + row["bc"]["ooo"]
            out.append((f"{key}: broadcast to {row['n']:,}: server CPU per delivery ≤ 1.3× one-send floor, nothing lost",
                        f"{row['bc']['cpu_us']:.2f} vs {row['floor']['cpu_us']:.2f} µs = {row['bc_ratio']:.2f}×; "
                        f"lost/dup/ooo {row['bc']['lost']}/{row['bc']['dup']}/{row['bc']['ooo']}",
                        verdict(row["bc_ratio"] <= 1.3 and lost == 0,
                                f"missed ({row['bc_ratio']:.2f}×{', lost ' + str(lost) if lost else ''})")))
    return out


def write_density(w: Callable[[str], None], R: dict, charts: list[str]) -> None:
    """The density section of RESULTS.md (from R["density"], which may come from another run)."""
    DEN = R["density"]
    D, M, P = DEN["results"], DEN["machine"], DEN["params"]
    DS = density_summary(D)
    w("## Density: 1 000 to 19 000 connections, per-connection cost and its slope\n")
    w(f"Measured by `{' '.join(DEN.get('argv') or ['run.py', '--scenarios', 'density'])}` on {M['date']} "
      f"({'QUICK run: small N, not the reference figures' if P.get('quick') else 'full run'}; wsmanager at git "
      f"{M['git']}){' — a separate run from the sections above, merged into results/raw.json' if DEN.get('merged') else ''}. "
      f"For each N a fresh server per shape holds N idle connections ({P.get('density_cycles', 1)} cycle"
      f"{'s, each on a fresh server, medians' * (P.get('density_cycles', 1) != 1)}: connect+handshake rate, RSS and "
      "GC-tracked objects, the longest natural gen-2 pause while connecting and idling, one forced `gc.collect()`, "
      "`get_stats()` in-process, median of 50); then, on the same processes, closed-loop broadcasts of 64 B from one "
      f"sender to all N ({P['density_rounds']} round{'s' * (P['density_rounds'] != 1)} × {P['duration']:g} s, "
      "interleaved with the one-send C floor at "
      "the same N). **N-averaged** = (value with N − value before) / N; **slope** = the change between two N values "
      "divided by the change in N, and the least-squares slope over all N: a slope equal to the average means the "
      "per-connection cost is flat in N, which is what carries it to N values this machine cannot hold.\n")
    other = [p["other_cpu"] / p["secs"] for recs in D["closed"].values() for rec in recs for p in rec["phases"]
             if p.get("secs")]
    if other:
        w(f"Other processes on the machine used a median of {median(other):.2f} cores (max {max(other):.2f} of "
          f"{M['cores']}) during the broadcast phases (the load client's per-pid /proc deltas). Above ~0.2 the machine "
          "was shared: wall-clock figures (connect rate, gen-2 and forced-collection pauses, fan-out latency) are "
          "inflated by preemption, while RSS, object counts and server CPU per delivery depend on it far less.\n")
    fd = DEN.get("fd_limits") or {}
    if fd:
        w(f"Descriptors: RLIMIT_NOFILE hard limit {fd.get('hard'):,} for the server and for the load client (separate "
          f"processes, each under it); the broadcast needs N + 1 connections in each, so the largest N here is "
          f"{fd.get('max_n'):,}.{' ' + fd['note'] if fd.get('note') else ''}\n")
    w("| server | N | connect+handshake /s | RSS/conn KiB | objects/conn | gen-2 natural max ms | forced gc ms | "
      "get_stats() ms | broadcast deliveries/s | server µs/deliv | floor µs/deliv | /1send | lost/dup/ooo | RSS with N MiB |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in D["keys"]:
        for r in DS[key]["rows"]:
            b, f = r["bc"], r["floor"]
            py = key in D["idle"]
            w(f"| {key} | {r['n']:,} | {fmt(r.get('connect_rate')) if py else '–'} | "
              f"{fmt(kib(r.get('rss_per_conn')), 2)} | {fmt(r.get('objects_per_conn'), 2)} | "
              f"{fmt(r.get('gen2_natural_max_ms'), 1)} | {fmt(r.get('forced_collect_ms'), 1)} | "
              f"{fmt(r.get('get_stats_ms'), 3)} | {fmt(b['dps'])} | {fmt(b['cpu_us'], 2)} | {fmt(f['cpu_us'], 2)} | "
              f"{ratio(b['cpu_us'], f['cpu_us'])} | {b['lost']}/{b['dup']}/{b['ooo']} | "
              f"{fmt(r.get('rss_idle') and r['rss_idle'] / 2**20, 0)} |")
    w("")
    w("Per-connection slopes (Δ between consecutive N / ΔN, then the least-squares fit over all N), beside the "
      "N-averaged figure at the largest N:\n")
    w("| server | between | RSS KiB/conn | objects/conn | longest gen-2 pause µs/conn | forced gc µs/conn |")
    w("|---|---|---|---|---|---|")
    for key in (k for k in D["keys"] if k in D["idle"]):
        sl = DS[key]["slopes"]
        for pair in sl["pairs"]:
            w(f"| {key} | {pair['from']:,} → {pair['to']:,} | {fmt(kib(pair.get('rss_delta')), 2)} | "
              f"{fmt(pair.get('objects_delta'), 2)} | {fmt(pair.get('gen2_max_ms') and pair['gen2_max_ms'] * 1000, 2)} | "
              f"{fmt(pair.get('forced_collect_ms') and pair['forced_collect_ms'] * 1000, 2)} |")
        fit = lambda k, scale=1.0: sl.get(k) and sl[k]["slope"] * scale  # noqa: E731
        w(f"| {key} | fit, all N | {fmt(fit('rss_delta', 1 / 1024), 2)} | {fmt(fit('objects_delta'), 2)} | "
          f"{fmt(fit('gen2_max_ms', 1000), 2)} | {fmt(fit('forced_collect_ms', 1000), 2)} |")
        top = next((r for r in reversed(DS[key]["rows"]) if r.get("open")), None)
        if top:
            w(f"| {key} | N-averaged at {top['n']:,} | {fmt(kib(top.get('rss_per_conn')), 2)} | "
              f"{fmt(top.get('objects_per_conn'), 2)} | {fmt(top['gen2_max_ms'] * 1000 / top['open'], 2)} | "
              f"{fmt((top.get('forced_collect_ms') or 0) * 1000 / top['open'], 2)} |")
    w("")
    w("Extrapolated from the least-squares fit (RSS = intercept + slope × N over the measured N; the gen-2 pause "
      "likewise: a full collection walks every tracked object, so its time grows with the object count):\n")
    w("| server | RSS at 100 000 | RSS at 1 000 000 | GC-tracked objects added by 100 000 | gen-2 pause at 100 000 | "
      "gen-2 pause at 1 000 000 |")
    w("|---|---|---|---|---|---|")
    for key in (k for k in D["keys"] if k in D["idle"]):
        e = DS[key]["extrapolated"]
        w(f"| {key} | {human_bytes((e.get('rss') or {}).get('100000'))} | {human_bytes((e.get('rss') or {}).get('1000000'))} | "
          f"{fmt((e.get('objects') or {}).get('100000'))} | {human_ms((e.get('gen2_ms') or {}).get('100000'))} | "
          f"{human_ms((e.get('gen2_ms') or {}).get('1000000'))} |")
    w("")
    kern = [(k, r) for k in D["keys"] if k in D["idle"] for r in DS[k]["rows"] if r.get("kernel_slab_per_socket")]
    if kern:
        k, r = max(kern, key=lambda kr: kr[1]["n"])
        w(f"Kernel memory (not in RSS), from /proc/meminfo `Slab` and /proc/net/sockstat `mem` with {r['n']:,} idle "
          f"connections of {k} (both ends on this machine, so per socket = Δ / 2N; a whole-machine figure, other "
          f"processes add noise): slab {fmt(kib(r['kernel_slab_per_socket']), 1)} KiB per socket, TCP buffer pages "
          f"{fmt(kib(r.get('kernel_tcp_mem_per_socket')), 2)} KiB per socket (idle sockets hold no queued data).\n")
    prev = (R.get("servers") or {}).get("wsm-native", {}).get("idle")
    if prev and "wsm-native" in DS:
        pn = prev[0]["n"]
        prss = median([c.get("rss_per_conn") for c in prev])
        pobj = median([c.get("objects_per_conn") for c in prev])
        now = next((r for r in reversed(DS["wsm-native"]["rows"]) if r.get("open")), None)
        if now and prss is not None and pobj is not None:
            w(f"Seed shape against the idle scenario above (wsm-native at {pn:,}, {R['machine']['date']}): "
              f"{kib(prss):.1f} KiB and {pobj:.1f} objects per connection then, "
              f"{fmt(kib(now.get('rss_per_conn')), 1)} KiB and {fmt(now.get('objects_per_conn'), 1)} now at {now['n']:,}.\n")
    det = DS.get("wsm-detached")
    top = next((r for r in reversed(det["rows"]) if r.get("types_per_conn")), None) if det else None
    if top:
        w(f"GC-tracked objects per detached connection by type at {top['n']:,} (top 8): " + ", ".join(
            f"{t} {c:.2f}" for t, c in list(top["types_per_conn"].items())[:8]) + ".\n")
    targets_table(w, "Targets (issue 14, at the largest N):", density_targets(DS))
    for c in charts:
        if "density" in c:
            w(f"![{c}]({c})\n")


def deflate_summary(D: dict) -> dict:
    """Per variant: per size the medians over the rounds (server µs and wire bytes per delivery,
    deliveries/s, the share that arrived compressed) and the sums of lost/dup/ooo; the idle
    cycles' medians."""
    out: dict[str, Any] = {}
    for name in D.get("variants", []):
        phases = [p for rec in D["closed"].get(name, []) for p in rec["phases"]]
        sizes = {}
        for size in sorted({p["size"] for p in phases}):
            ph = [p for p in phases if p["size"] == size and p["deliveries"]]
            sizes[size] = {"cpu_us": median([p["cpu_us_per_delivery"] for p in ph]),
                           "wire": median([p["rx_bytes"] / p["deliveries"] for p in ph]),
                           "dps": median([p["dps"] for p in ph]),
                           "compressed": median([p["compressed"] / p["deliveries"] for p in ph]),
                           "inflated": median([p["inflated"] / p["deliveries"] for p in ph]),
                           "other_cpu": median([p["other_cpu"] / p["secs"] for p in ph]),
                           "lost": sum(p["lost"] + p["incomplete"] for p in ph),
                           "dup": sum(p["dup"] for p in ph), "ooo": sum(p["ooo"] for p in ph), "runs": len(ph)}
        idle = D["idle"].get(name, [])
        out[name] = {"sizes": sizes, "idle": {
            k: median([c.get(k) for c in idle if c.get(k) is not None])
            for k in ("rss_per_conn", "objects_per_conn", "connect_rate", "deflate", "open")}}
        out[name]["idle"]["cycles"] = len(idle)
    return out


def deflate_targets(DS: dict, sizes: list[int]) -> list[tuple[str, str, str]]:
    """Issue 13's targets, ratios within this run."""
    out: list[tuple[str, str, str]] = []
    z, plain, stock = DS.get("native-z"), DS.get("native-plain"), DS.get("stock-z")
    if not (z and plain and stock):
        return out
    big = max(sizes)

    def cpu(v: dict, size: int) -> float | None:
        return v["sizes"].get(size, {}).get("cpu_us")

    r = (cpu(z, big) or 0) / cpu(plain, big) if cpu(plain, big) else None
    if r is not None:
        out.append((f"native compressed: server CPU per delivery ≤ 1.3× native uncompressed ({big:,} B)",
                    f"{cpu(z, big):.2f} vs {cpu(plain, big):.2f} µs = {r:.2f}×",
                    "met" if r <= 1.3 else f"missed by {r / 1.3:.2f}×"))
    for size in sizes:
        if cpu(z, size) and cpu(stock, size):
            r = cpu(z, size) / cpu(stock, size)
            out.append((f"native compressed: server CPU per delivery ≤ 1/5 of the stock server's compressed "
                        f"broadcast ({size:,} B)", f"{cpu(z, size):.2f} vs {cpu(stock, size):.2f} µs = 1/{1 / r:.1f}",
                        "met" if r <= 0.2 else f"missed by {r / 0.2:.2f}×"))
    for size in sizes:
        a, b = z["sizes"].get(size, {}).get("wire"), stock["sizes"].get(size, {}).get("wire")
        if a and b:
            out.append((f"native compressed: wire bytes per delivery within 1.5× of the stock server's ({size:,} B)",
                        f"{a:.0f} vs {b:.0f} B = {a / b:.2f}×", "met" if a / b <= 1.5 else f"missed by {a / b / 1.5:.2f}×"))
    a, b = z["idle"].get("rss_per_conn"), plain["idle"].get("rss_per_conn")
    if a is not None and b is not None:
        d = (a - b) / 1024
        out.append(("RSS per idle connection with compression negotiated: ≤ 1 KiB more than without",
                    f"{kib(a):.2f} vs {kib(b):.2f} KiB = {d:+.2f} KiB", "met" if d <= 1 else f"missed by {d - 1:.2f} KiB"))
    return out


def write_deflate(w: Callable[[str], None], R: dict) -> None:
    """The compressed-broadcast section of RESULTS.md (R["deflate"], possibly from another run)."""
    DF = R["deflate"]
    D, M, P = DF["results"], DF["machine"], DF["params"]
    DS = deflate_summary(D)
    sizes = P["deflate_sizes"]
    w("## Compressed broadcast (permessage-deflate)\n")
    w(f"Measured by `{' '.join(DF.get('argv') or ['run.py', '--scenarios', 'deflate'])}` on {M['date']} "
      f"({'QUICK run, not the reference figures' if P.get('quick') else 'full run'}; wsmanager at git {M['git']})"
      f"{' — a separate run from the sections above, merged into results/raw.json' if DF.get('merged') else ''}. "
      f"Closed-loop broadcasts from one sender to {P['deflate_n']:,} receivers, {P['deflate_rounds']} round"
      f"{'s' * (P['deflate_rounds'] != 1)} × {P['duration']:g} s per size, the variants interleaved round by round; "
      "the messages are JSON-like text that differs from message to message (`loadclient --filler text`: zlib level 6 "
      "compresses one on its own to ~41% at 700 B and ~24% at 9 KB, a stream of them to ~24% and ~20%). "
      "*compressed*: every receiver offers `permessage-deflate; client_max_window_bits` as browsers do; every "
      f"{DEFLATE_INFLATE_EVERY}th inflates what it gets with its window kept and checks every message, the others "
      "count compressed frames (`--inflate-every`: 1 000 windows in the load client would crowd the server out of "
      "the shared caches); *uncompressed*: the receivers offer nothing. The native "
      "plane compresses a receiver set's broadcasts once, in a context the set shares (README \"Compression\"); "
      "stock uvicorn's websockets compresses per connection. **Wire bytes** = bytes the receivers read from their "
      "sockets per delivery (frames with their headers, without TCP/IP). Then, each on a fresh server, "
      f"{P['deflate_idle_n']:,} idle connections with and without compression negotiated "
      f"({P['deflate_cycles']} cycle{'s' * (P['deflate_cycles'] != 1)}, medians).\n")
    other = [x["other_cpu"] for v in DS.values() for x in v["sizes"].values() if x.get("other_cpu") is not None]
    if other:
        w(f"Other processes used {min(other):.2f}-{max(other):.2f} CPU cores during the phases (median per "
          "variant and size).\n")
    names = list(DS)
    w("| figure | " + " | ".join(DEFLATE_LABELS.get(n, n) for n in names) + " |")
    w("|---|" + "---:|" * len(names))

    def row(label: str, get: Callable[[dict], Any], nd: int = 2, unit: str = "") -> None:
        w(f"| {label} | " + " | ".join(fmt(get(DS[n]), nd, unit) for n in names) + " |")

    for size in sizes:
        row(f"{size:,} B: server CPU per delivery, µs", lambda v: v["sizes"].get(size, {}).get("cpu_us"))
        row(f"{size:,} B: wire bytes per delivery", lambda v: v["sizes"].get(size, {}).get("wire"), 0)
        row(f"{size:,} B: share delivered compressed / inflated and checked by the client",
            lambda v: "{} / {}".format(fmt(v["sizes"].get(size, {}).get("compressed"), 2),
                                       fmt(v["sizes"].get(size, {}).get("inflated"), 2)), 0)
        row(f"{size:,} B: deliveries/s (the load client is the limit)",
            lambda v: v["sizes"].get(size, {}).get("dps"), 0)
        row(f"{size:,} B: lost / dup / out of order",
            lambda v: "/".join(str(v["sizes"].get(size, {}).get(k, "–")) for k in ("lost", "dup", "ooo")), 0)
    row("idle: RSS per connection, KiB", lambda v: kib(v["idle"].get("rss_per_conn")))
    row("idle: GC-tracked objects per connection", lambda v: v["idle"].get("objects_per_conn"), 1)
    row("idle: connections that negotiated compression", lambda v: v["idle"].get("deflate"), 0)
    w("")
    ratios = []
    z, plain, stock = DS.get("native-z"), DS.get("native-plain"), DS.get("stock-z")
    if z and stock:
        for size in sizes:
            a, b = z["sizes"].get(size, {}), stock["sizes"].get(size, {})
            if a.get("cpu_us") and b.get("cpu_us"):
                ratios.append(f"{size:,} B: server CPU native/stock {ratio(a['cpu_us'], b['cpu_us'])}, wire bytes "
                              f"native/stock {ratio(a.get('wire'), b.get('wire'))}"
                              + (f", CPU compressed/uncompressed (native) {ratio(a['cpu_us'], plain['sizes'].get(size, {}).get('cpu_us'))}"
                                 if plain else ""))
    if ratios:
        w("Ratios in this run: " + "; ".join(ratios) + ".\n")
    targets_table(w, "Targets (issue 13, ratios within this run):", deflate_targets(DS, sizes))


def density_chart(plt, R: dict, files: list[str]) -> None:
    """RSS and the longest gen-2 pause against N: measured points, and the fitted line out to
    1 000 000 connections."""
    D = R["density"]["results"]
    DS = density_summary(D)
    keys = [k for k in D["keys"] if k in D["idle"]]
    if not keys:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lo, hi = min(D["ns"]), max(EXTRAPOLATE)
    xs = [lo * (hi / lo) ** (i / 60) for i in range(61)]  # the fitted lines, even on log axes
    for i, key in enumerate(keys):
        color = f"C{i}"
        rows = [r for r in DS[key]["rows"] if r.get("open")]
        sl = DS[key]["slopes"]
        axes[0].plot([r["open"] for r in rows], [r["rss_idle"] / 2**20 for r in rows], "o", color=color, label=key)
        axes[1].plot([r["open"] for r in rows], [max(r["gen2_max_ms"], 0.01) for r in rows], "o", color=color,
                     label=key)
        ex = DS[key]["extrapolated"]
        if "rss_idle" in sl:
            f = sl["rss_idle"]
            axes[0].plot(xs, [(f["intercept"] + f["slope"] * x) / 2**20 for x in xs], "--", color=color, lw=1)
            axes[0].plot(EXTRAPOLATE, [ex["rss"][str(x)] / 2**20 for x in EXTRAPOLATE], "x", color=color)
        if "gen2_max_ms" in sl:
            f = sl["gen2_max_ms"]
            flat = f["slope"] <= 0
            axes[1].plot(xs, [max(ex["gen2_ms"]["100000"] if flat else f["intercept"] + f["slope"] * x, 0.01)
                              for x in xs], "--", color=color, lw=1)
            axes[1].plot(EXTRAPOLATE, [max(ex["gen2_ms"][str(x)], 0.01) for x in EXTRAPOLATE], "x", color=color)
    axes[0].set_title("server RSS (MiB) with N idle connections\n(o measured, dashed: fitted slope, x extrapolated)",
                      fontsize=10)
    axes[1].set_title("longest gen-2 pause (ms) with N idle connections\n(o measured, dashed: fitted slope, "
                      "x extrapolated; red: 20 ms)", fontsize=10)
    axes[1].axhline(20, color="r", ls=":", lw=0.8)
    _log_axes(axes, "connections")
    _save_chart(plt, fig, "density.png", files)


def write_report(R: dict, args: argparse.Namespace, quiet: bool = False) -> None:
    S = summarize(R)
    charts = [] if quiet else write_charts(R, S)  # partial reports leave the charts out
    M = R["machine"]
    L: list[str] = []
    w = L.append
    w("# wsmanager benchmarks\n")
    quick, runs = R["params"].get("quick", args.quick), R["params"].get("runs", args.runs)
    w(f"Written by `benchmarks/run.py{' --quick' if quick else ''}` on {M['date']} "
      f"({'QUICK run: small sizes, fewer runs — not the reference figures' if quick else 'full run'}). "
      f"Medians of {runs} runs per configuration ({R['params'].get('closed_runs', runs)} for the "
      "closed-loop broadcasts); all traffic on 127.0.0.1; the load client "
      "(C, epoll, one thread) shares the machine's cores with the server, so **server CPU per delivery** is "
      "the figure that does not depend on the client. Ratios: `/ref` = to the seed's manager on stock uvicorn, "
      "`/1send` = to the one-send C floor.\n")
    if R.get("notes"):
        for n in R["notes"]:
            w(f"- **Note:** {n}")
        w("")
    w("## Machine\n")
    w(f"- {M['cores']} cores, {M['cpu']}, {M['memory']} RAM; kernel {M['kernel']}; {M['os']}")
    w(f"- Python {M['python']}, gcc {M['gcc']}; wsmanager at git {M['git']}")
    w("- " + ", ".join(f"{k} {v}" for k, v in M["packages"].items()))
    w("- uvicorn runs single-process with its defaults (`--loop auto` → uvloop, `--http auto` → "
      f"{'httptools' if M['packages'].get('httptools') != 'not installed' else 'h11 (httptools is not installed)'})\n")
    w("## Servers\n")
    w("| key | what | command |\n|---|---|---|")
    for k, s in SERVERS.items():
        if k not in R["servers"] and not (R.get("chat") and k in R["chat"]["ramp"]):  # noqa: SIM102
            continue
        env = "".join(f"{name}={value} " for name, value in s.get("env", {}).items())
        cmd = (f"`{env}uvicorn {' '.join([s['app'], *s['extra']])}`" if "app" in s
               else f"`benchmarks/build/{s['floor']} PORT`")
        w(f"| {k} | {s['label']} | {cmd} |")
    w("")

    # targets first: the summary
    targets_table(w, "## Performance targets (native plane; [docs/architecture.md]"
                  "(../docs/architecture.md#8-performance-targets))", targets(R, S))

    if S["closed"]:
        w("## Closed-loop broadcast\n")
        w("One sender broadcasts, waits until every receiver has the message, sends the next. Fan-out time = "
          "send → the last receiver has it. CPU columns: seconds of CPU per second of wall time.\n")
        w("| receivers | size | server | deliveries/s | /ref | /1send | p50 ms | p99 ms | server µs/deliv | /1send "
          "| server CPU | client CPU | other CPU | lost/dup/ooo | RSS before → with N → after (MiB) |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for (n, size), v in sorted(S["closed"].items()):
            ref, fl = v.get("ref", {}), v.get("floor-onesend", {})
            for k in SERVERS:
                if k not in v:
                    continue
                x = v[k]
                mib = lambda b: f"{b / 2**20:.0f}" if b else "–"  # noqa: E731
                w(f"| {n:,} | {size} | {k} | {fmt(x['dps'])} | {ratio(x['dps'], ref.get('dps'))} | "
                  f"{ratio(x['dps'], fl.get('dps'))} | {fmt(x['p50'], 2)} | {fmt(x['p99'], 2)} | {fmt(x['cpu_us'], 2)} | "
                  f"{ratio(x['cpu_us'], fl.get('cpu_us'))} | {fmt(x['server_cpu'], 2)} | {fmt(x['client_cpu'], 2)} | "
                  f"{fmt(x['other_cpu'], 2)} | {x['lost']}/{x['dup']}/{x['ooo']} | "
                  f"{mib(x['rss_before'])} → {mib(x['rss_with'])} → {mib(x['rss_after'])} |")
        w("")
    chat = R.get("chat")
    if chat:
        w(f"## Chat: {chat['senders']} senders open-loop, {chat['receivers']:,} receivers\n")
        w("Every message goes to every other connection. Rates ramp ×2; servers are interleaved at each rate; a "
          "server stops at its first rate where the majority of runs lost a message or had p99 ≥ 250 ms.\n")
        sus = chat["sustained"]
        ref, co = sus.get("ref"), sus.get("floor-coalesce")
        w("| server | sustained deliveries/s | at msg/s | p99 ms | /ref | /coalescing floor |\n|---|---|---|---|---|---|")
        for k, s in sus.items():
            if s is None:
                w(f"| {k} | failed at the lowest rate | – | – | – | – |")
                continue
            w(f"| {k} | {fmt(s['dps'])} | {s['rate']:g} | {fmt(s['p99_ms'], 1)} | {ratio(s['dps'], ref and ref['dps'], 1)} | "
              f"{ratio(s['dps'], co and co['dps'])} |")
        w("")
        rates = sorted({st["rate"] for steps in chat["ramp"].values() for st in steps})
        w("Ramp detail (median deliveries/s, p99 ms, lost, verdict):\n")
        w("| msg/s | offered/s | " + " | ".join(chat["ramp"]) + " |")
        w("|---|---|" + "---|" * len(chat["ramp"]))
        for r in rates:
            cells = []
            for k, steps in chat["ramp"].items():
                st = next((s for s in steps if s["rate"] == r), None)
                cells.append("" if st is None else f"{fmt(st['dps'])} / {fmt(st['p99_ms'], 0)} ms / {st['lost']} "
                             f"{'✓' if st['passed'] else '✗'}")
            w(f"| {r:g} | {r * (chat['receivers'] + chat['senders'] - 1):,.0f} | " + " | ".join(cells) + " |")
        w("")
    if S["loop"]:
        w("## Event-loop freedom\n")
        w("`GET /health` every 10 ms on one keep-alive connection while closed-loop broadcasts (64 B) to the "
          "receivers run back to back (one prober per broadcast phase; latency from the write of each request; "
          "`benchmarks/results/raw.json` also has it from each request's scheduled time).\n")
        w("| server | receivers | HTTP p50 ms | HTTP p99 ms | max ms | broadcast deliveries/s | "
          "broadcast p99 ms | runs |\n|---|---|---|---|---|---|---|---|")
        for k, x in S["loop"].items():
            w(f"| {k} | {x['n']:,} | {fmt(x['p50'], 2)} | {fmt(x['p99'], 2)} | {fmt(x['max'], 1)} | "
              f"{fmt(x['dps'])} | {fmt(x['bc_p99'], 1)} | {x['runs']} |")
        short, default = S["loop"].get("wsm-native"), S["loop"].get("wsm-native-slice0")
        if short and default and short.get("p99") and default.get("p99"):
            w(f"\nThe event-loop thread's scheduler slice (`WSMANAGER_LOOP_SLICE_US`, wsmanager.uvicorn): 100 µs "
              f"(wsm-native) against the kernel's default (wsm-native-slice0): HTTP p99 {fmt(short['p99'], 2)} vs "
              f"{fmt(default['p99'], 2)} ms ({default['p99'] / short['p99']:.2f}×), broadcast deliveries/s "
              f"{fmt(short['dps'])} vs {fmt(default['dps'])}. What a slow request waits for (perf sched timehist "
              "and strace of the event-loop thread during one phase): writing the response wakes the prober on "
              "the same core, the event-loop thread is preempted inside that write(), and the busy I/O thread "
              "may run until the next scheduler tick (4 ms at HZ=250) before the event-loop thread gets the core "
              "back; a short slice gives it an earlier deadline, so it is picked sooner.")
        w("")
    if S["idle"]:
        w("## Idle connections: memory, GC, stats, connect rate\n")
        w("Per-connection figures are (value with N idle − value before) / N. The gen-2 pause is the longest "
          "natural generation-2 collection seen by `gc.callbacks` while connecting and idling; `forced` is one "
          "`gc.collect()` with N idle. `get_stats()` is timed in-process (median of 50 calls); the HTTP column is "
          "`GET /api/v1/ws/stats` (p50/p99 over 2 s at 20 Hz).\n")
        w("| server | N | connect+handshake /s | handshake p99 ms | RSS/conn KiB | objects/conn | gen-2 max ms | "
          "forced gc ms | get_stats() ms | GET stats p50/p99 ms | RSS before → idle → after MiB |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for k, x in S["idle"].items():
            mib = lambda b: f"{b / 2**20:.0f}" if b else "–"  # noqa: E731
            w(f"| {k} | {x['n']:,} | {fmt(x['connect_rate'])} | {fmt(x['hs_p99_ms'], 1)} | "
              f"{fmt(x['rss_per_conn'] and x['rss_per_conn'] / 1024, 1)} | {fmt(x['objects_per_conn'], 1)} | "
              f"{fmt(x['gen2_natural_max_ms'], 1)} | {fmt(x['forced_collect_ms'], 1)} | {fmt(x['get_stats_ms'], 3)} | "
              f"{fmt(x.get('http_stats_p50'), 1)} / {fmt(x.get('http_stats_p99'), 1)} | "
              f"{mib(x['rss_before'])} → {mib(x['rss_idle'])} → {mib(x['rss_after'])} |")
        w("")
    share = []
    for plane, w_key, b_key in (("portable", "wsm-portable", "bare"), ("native", "wsm-native", "bare-native")):
        a, b = S["idle"].get(w_key), S["idle"].get(b_key)
        if a and b and a.get("objects_per_conn") is not None and b.get("objects_per_conn") is not None:
            share.append(f"{plane} plane: {a['objects_per_conn'] - b['objects_per_conn']:.1f} objects and "
                         f"{((a['rss_per_conn'] or 0) - (b['rss_per_conn'] or 0)) / 1024:.1f} KiB per connection "
                         f"({w_key} − {b_key}; the bare FastAPI endpoint alone: {b['objects_per_conn']:.1f} objects, "
                         f"{(b['rss_per_conn'] or 0) / 1024:.1f} KiB)")
    if share:
        w("wsmanager's own share of the per-connection cost (the seed endpoint on wsmanager minus a bare FastAPI "
          "endpoint with no manager, same plane): " + "; ".join(share) + ".\n")
    types = {k: (R["servers"][k].get("idle") or [{}])[-1].get("types_per_conn") for k in R["servers"]}
    types = {k: v for k, v in types.items() if v}
    if types:
        w("GC-tracked objects per idle connection by type (last cycle, top 10 per server):\n")
        for k, v in types.items():
            top = list(v.items())[:10]
            w(f"- **{k}**: " + ", ".join(f"{t} {c:.2f}" for t, c in top))
        w("")
    if R.get("density"):
        write_density(w, R, charts)
    if R.get("deflate"):
        write_deflate(w, R)
    if S["echo"]:
        w("## Echo\n")
        ref, por = S["echo"].get("ref", {}), S["echo"].get("wsm-portable", {})
        w("| server | round trips/s | /ref | /wsm-portable | p50 ms | p99 ms | server µs per round trip |")
        w("|---|---|---|---|---|---|---|")
        for k, x in S["echo"].items():
            w(f"| {k} | {fmt(x['rps'])} | {ratio(x['rps'], ref.get('rps'))} | {ratio(x['rps'], por.get('rps'))} | "
              f"{fmt(x['p50'], 2)} | {fmt(x['p99'], 2)} | {fmt(x['cpu_us'], 1)} |")
        w("")
    sw = R.get("sweep")
    if sw:
        w("## Heartbeat sweep\n")
        w(f"`wsmanager._core.Registry` with {sw['n']:,} open connections (`stale_after=30`), `sweep()` timed; a "
          "Python thread spins during the sweep (switch interval 0.1 ms) and its longest stall is shown — a sweep "
          "holding the GIL throughout would stall it for the whole sweep. For comparison, the seed's stale check "
          f"(`_send_pings` without its sends) over {sw['n']:,} `ConnectionInfo` objects.\n")
        w("| measurement | median ms | runs |\n|---|---|---|")
        w(f"| sweep, none due | {median(sw['none_due_ms']):.4f} | {len(sw['none_due_ms'])} |")
        w(f"| sweep, all {sw['n']:,} due (returns the handles) | {median(sw['all_due_ms']):.3f} | {len(sw['all_due_ms'])} |")
        w(f"| longest stall of a spinning Python thread during that sweep | {median(sw['stall_all_due_ms']):.3f} | "
          f"{len(sw['stall_all_due_ms'])} |")
        w(f"| seed's stale check over {sw['n']:,} (pure Python) | {median(sw['ref_check_ms']):.1f} | {len(sw['ref_check_ms'])} |")
        w(f"| registering {sw['n']:,} connections (add + set_state), s | {median(sw['add_s']) * 1000:.0f} | {len(sw['add_s'])} |")
        w("")
    for pr in R.get("profiles") or []:
        ph = (pr.get("phases") or [{}])[0]
        if pr is R["profiles"][0]:
            w("## Profiles\n")
            w("`perf record -F 499 -p SERVER` (no call graphs) during one closed-loop broadcast phase, 64 B; "
              "share of the server's samples by shared object and by symbol (≥ 0.7%).\n")
        w(f"### {pr['key']}, {pr['n']:,} receivers: {fmt(ph.get('cpu_us_per_delivery'), 2)} µs server CPU per "
          f"delivery, {fmt(ph.get('dps'))} deliveries/s\n")
        w("```")
        w("\n".join(pr["by_dso"]))
        w("")
        w("\n".join(pr["by_symbol"]))
        w("```\n")
    for pr in R.get("pyprofiles") or []:
        if pr is R["pyprofiles"][0]:
            w("## Where the Python thread's time goes (py-spy)\n")
            w("`py-spy record -r 200` of the server during a connect ramp and during an echo phase; every sample is "
              "charged to the layer of its innermost Python frame. This is the profile behind the connect, echo and "
              "idle-memory rows: the FastAPI/Starlette stack the endpoint runs in is the same on every plane.\n")
        what = "connect+handshake ramp" if pr["mode"] == "connect" else "echo"
        unit = "connections/s" if pr["mode"] == "connect" else "round trips/s"
        w(f"### {pr['key']}, {what} over {pr['n']:,} connections ({fmt(pr.get('rate'))} {unit}, "
          f"{pr['samples']:,} samples)\n")
        w("| layer (innermost frame) | share |\n|---|---|")
        for k, v in pr["layers"]:
            w(f"| {k} | {v * 100:.1f}% |")
        w("\nLargest inclusive shares, then wsmanager's own functions (inclusive):\n")
        w("```")
        for f, v in pr["inclusive"]:
            w(f"{v * 100:5.1f}%  {f[:140]}")
        if pr.get("ours"):
            w("--- wsmanager")
            for f, v in pr["ours"]:
                w(f"{v * 100:5.1f}%  {f[:140]}")
        w("```\n")
    charts = [c for c in charts if "density" not in c]  # shown in its section
    if charts:
        w("## Charts\n")
        for c in charts:
            w(f"![{c}]({c})")
        w("")
    w("## How these figures were produced\n")
    w("```")
    w("make bench                 # = .venv/bin/python benchmarks/run.py")
    w("make bench-quick           # = .venv/bin/python benchmarks/run.py --quick")
    w(f"# this run: {' '.join(R.get('argv') or [Path(sys.argv[0]).name] + sys.argv[1:])}")
    w("# parameters: " + json.dumps(R["params"]))
    w("# load client examples (see benchmarks/loadclient.c):")
    w("benchmarks/build/loadclient --port P --path '/api/v1/ws?token=tok-u{i}' -n 1001 --mode broadcast "
      "--sizes 64,4096 --runs 3 --duration 2 --watch-pid SERVER_PID")
    w("benchmarks/build/loadclient --port P --path ... -n 1010 --mode chat --senders 10 --rates 80 --runs 3 "
      "--duration 2 --grace 2")
    w("benchmarks/build/http_prober P /health 5 10")
    w("```\n")
    w("Raw per-run results (every phase, with server/client/other CPU): `benchmarks/results/raw.json`; server "
      "logs: `benchmarks/results/logs/`.\n")
    w("### Caveats\n")
    w("- Closed-loop, event-loop freedom and echo: every server is started afresh for each scenario and they all "
      "stay up while the runs are interleaved round by round (server A run 1, server B run 1, …, server A run 2, …), "
      "each run with a fresh client and fresh connections, so that a slow stretch of the (shared, virtual) machine "
      "weighs on every server alike.")
    w("- The reference app sets `REF_PING_TIMEOUT=3600`: the seed's heartbeat otherwise drops every connection "
      "older than 20 s at its first tick (30 s), see `benchmarks/reference_app.py`.")
    w("- `other CPU` is the CPU of every other process on the machine during the phase (per-pid /proc deltas); "
      "high values mean the machine was shared.")
    w("- Server CPU includes the kernel's TCP work done in the server's context; on loopback that includes much "
      "of the receive path of the client's sockets (softirq), the same for every server. /proc CPU times have "
      "10 ms resolution.")
    w("- The chat ramp doubles the rate at each step, so a sustained figure is within 2× below the true capacity; "
      "at the top rates the single-threaded load client is the limit (watch `client CPU` in raw.json).")
    w("- Idle cycles each run on a fresh server process (RSS freed by an earlier cycle would be reused and hide "
      "the per-connection cost).")
    (REPORT_DIR / "RESULTS.md").write_text("\n".join(L) + "\n")
    if not quiet:
        log(f"wrote {REPORT_DIR / 'RESULTS.md'}")


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, one run each: under 2 minutes")
    ap.add_argument("--only", default="", help="comma-separated server keys")
    ap.add_argument("--scenarios", default=None,
                    help="comma-separated subset of idle,closed,loop,echo,chat,profile,sweep,density,deflate "
                         "(default: all but density and deflate; --quick leaves out profile)")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply the connection counts (idle, closed-loop, event-loop, profile): to try the "
                         "driver on a busy machine")
    ap.add_argument("--density-ns", default=None,
                    help="comma-separated N values of the density scenario (default 1000,5000,19000; --quick "
                         "200,500,1000; both multiplied by --scale)")
    ap.add_argument("--out", default=None,
                    help="write RESULTS.md, results/ and charts/ under this directory instead of benchmarks/ "
                         "(the tests' runs)")
    ap.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results/raw.json")
    args = ap.parse_args()

    global OUT, CHARTS, REPORT_DIR
    if args.out:
        REPORT_DIR = Path(args.out).resolve()
        OUT, CHARTS = REPORT_DIR / "results", REPORT_DIR / "charts"
    raise_nofile()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        R = json.loads((OUT / "raw.json").read_text())
        args.runs = R["params"]["runs"]
        args.quick = R["params"]["quick"]
        write_report(R, args)
        return 0
    if args.quick:
        P = dict(runs=args.runs or 2, idle_n=1000, idle_cycles=1, closed_ns=[1000], sizes=[64, 4096], duration=0.3,
                 loop_n=1000, loop_runs=1, loop_duration=1.5, echo_n=100, echo_duration=0.4,
                 chat_rates=[10, 80, 640], chat_runs=1, chat_duration=0.6, chat_grace=0.5,
                 chat_receivers=1000, chat_senders=10, sweep_n=100_000, ref_5k=False, probe_s=0.4, profile_n=1000,
                 closed_runs=args.runs or 2)
    else:
        P = dict(runs=args.runs or 3, idle_n=10000, idle_cycles=args.runs or 3, closed_ns=[1000, 10000],
                 sizes=[64, 4096], duration=2.0, loop_n=5000, loop_runs=args.runs or 3, loop_duration=5.0,
                 echo_n=100, echo_duration=2.0, chat_rates=[5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240],
                 chat_runs=args.runs or 3, chat_duration=1.5, chat_grace=1.5, chat_receivers=1000, chat_senders=10,
                 sweep_n=100_000, ref_5k=True, probe_s=2.0, profile_n=10000,
                 # closed-loop phases are short and the client shares the cores: five for steadier medians
                 closed_runs=args.runs or 5)
    P.update(density_ns=[200, 500, 1000] if args.quick else [1000, 5000, 19000],
             density_rounds=args.runs or (1 if args.quick else 3), density_cycles=args.runs or (1 if args.quick else 3),
             density_settle=0.5 if args.quick else 1.0)
    if args.density_ns:
        P["density_ns"] = [int(x) for x in args.density_ns.split(",")]
    P.update(deflate_n=100 if args.quick else 1000, deflate_sizes=[700, 9000],
             deflate_rounds=args.runs or (1 if args.quick else 3), deflate_cycles=args.runs or (1 if args.quick else 2),
             deflate_idle_n=500 if args.quick else 5000)
    if args.scale != 1.0:
        for k in ("deflate_n", "deflate_idle_n"):
            P[k] = max(10, int(P[k] * args.scale))
        P["density_ns"] = [max(10, int(n * args.scale)) for n in P["density_ns"]]
        for k in ("idle_n", "loop_n", "profile_n"):
            P[k] = max(10, int(P[k] * args.scale))
        P["closed_ns"] = [max(10, int(n * args.scale)) for n in P["closed_ns"]]
        P["scale"] = args.scale
    P["quick"] = args.quick
    args.runs = P["runs"]
    scen = set((args.scenarios or ("idle,closed,loop,echo,chat,sweep" if args.quick else
                                   "idle,closed,loop,echo,chat,profile,sweep")).split(","))
    keys = [k for k in SERVERS if (k in args.only.split(",") if args.only else
                                   not (args.quick and "scenarios" in SERVERS[k]))]
    notes = []
    build()
    ok, why = native_available()
    if not ok and "wsm-native" in keys:
        keys = [k for k in keys if NATIVE_WS not in SERVERS[k].get("extra", [])]
        notes.append(f"native plane unavailable (`import wsmanager.uvicorn`: {why}); wsm-native not measured")
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]]
    R: dict[str, Any] = {"machine": machine(), "params": P, "servers": {}, "notes": notes, "argv": argv}
    # the density and deflate scenarios have sections of their own in raw.json and RESULTS.md
    # (SECTIONS): a run of such scenarios alone merges into the previous raw.json (every other
    # section stays as it was), and a run without one of them carries its previous section over
    prev = None
    with contextlib.suppress(OSError, ValueError):
        prev = json.loads((OUT / "raw.json").read_text())
    merged = scen <= set(SECTIONS) and prev is not None and bool(prev.get("servers"))
    if merged:
        assert prev is not None
        if not prev.get("argv"):  # written before raw.json kept its command: RESULTS.md has it
            with contextlib.suppress(OSError):
                for line in (REPORT_DIR / "RESULTS.md").read_text().splitlines():
                    if line.startswith("# this run: "):
                        prev["argv"] = line[len("# this run: "):].split()
        R = prev
    elif prev is not None:
        R.update({sec: prev[sec] for sec in SECTIONS if sec not in scen and prev.get(sec)})
    if "density" in scen:
        dkeys = [k for k in DENSITY_KEYS if (k in args.only.split(",") if args.only else True)]
        if not ok:
            dkeys = [k for k in dkeys if NATIVE_WS not in SERVERS[k].get("extra", [])]
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        max_n = hard - 1 - FD_SPARE if hard != resource.RLIM_INFINITY else 10**9
        ns = sorted({min(n, max_n) for n in P["density_ns"]})
        note = (f"N capped at {max_n:,} (asked for {', '.join(f'{n:,}' for n in P['density_ns'] if n > max_n)})"
                if any(n > max_n for n in P["density_ns"]) else "")
        if note:
            log(f"  density: {note}")
        R["density"] = {"machine": machine(), "params": {**P, "density_ns": ns}, "argv": argv, "merged": merged,
                        "fd_limits": {"hard": hard if hard != resource.RLIM_INFINITY else None, "max_n": max_n,
                                      "note": note}, "notes": notes,
                        "results": {"ns": ns, "keys": dkeys, "idle": {}, "closed": {}}}
        log(f"== density: {', '.join(dkeys)} at N = {', '.join(map(str, ns))}")
    if "deflate" in scen:
        if not ok:
            notes.append("deflate: the native plane is unavailable; only the stock variants are measured")
        variants = [name for name, key, _ in DEFLATE_VARIANTS if ok or NATIVE_WS not in SERVERS[key]["extra"]]
        R["deflate"] = {"machine": machine(), "params": P, "argv": argv, "merged": merged, "notes": notes,
                        "results": {"variants": variants, "closed": {}, "idle": {}}}
    t_start = time.monotonic()
    log(f"servers: {', '.join(keys)}; scenarios: {', '.join(sorted(scen))}; {'quick' if args.quick else 'full'}")

    def save(report: bool = True) -> None:
        if merged:
            for sec in scen:
                R[sec]["elapsed_s"] = time.monotonic() - t_start
                R[sec]["log"] = LOG
        else:
            R["elapsed_s"] = time.monotonic() - t_start
            R["log"] = LOG
        (OUT / "raw.json").write_text(json.dumps(R, indent=1, default=str))
        if report:  # a partial RESULTS.md after every step: an interrupted run still leaves its figures
            try:
                write_report(R, args, quiet=True)
            except Exception as e:  # noqa: BLE001 - the report must not stop the measurements
                log(f"  (partial report failed: {e!r})")

    # the cheap and the ramp first; then the idle cycles server by server, then the interleaved scenarios
    order = ["floor-onesend", "floor-coalesce", "ref", "wsm-native", "wsm-native-slice0", "wsm-portable",
             "ref-wsproto", "bare-native", "bare", "wsm-detached"]
    try:
        if "sweep" in scen:
            log("== sweep")
            R["sweep"] = scen_sweep(P["sweep_n"], max(P["runs"], 3))
            save(False)
        if "chat" in scen:
            log("== chat ramp")
            R["chat"] = scen_chat([k for k in keys if takes_part(k, "chat")], P["chat_rates"],
                                  P["chat_runs"], P["chat_duration"], P["chat_grace"], P["chat_receivers"],
                                  P["chat_senders"])
            save()
        ordered = sorted(keys, key=order.index)
        if "idle" in scen:
            for key in (k for k in ordered if takes_part(k, "idle")):
                log(f"== idle: {key}")
                res = R["servers"].setdefault(key, {})
                res["idle"] = scen_idle(key, P["idle_n"], P["idle_cycles"], P["probe_s"])
                if P["ref_5k"] and key == "ref":
                    res["idle_5k"] = scen_idle(key, P["idle_n"] // 2, P["idle_cycles"], P["probe_s"])
                save()
        # closed, loop, echo: every server of the run is up at once (fresh processes for each
        # scenario) and the runs are interleaved round by round, so that a slow stretch of a
        # shared machine falls on every server alike instead of on whichever ran then
        rounds = {"closed": P["closed_runs"], "loop": P["loop_runs"], "echo": P["runs"]}
        for name in ("closed", "loop", "echo"):
            live = [k for k in ordered if takes_part(k, name)]
            if name not in scen or not live:
                continue
            log(f"== {name}: {', '.join(live)}; {rounds[name]} interleaved rounds")
            servers: dict[str, Server] = {}
            try:
                for key in live:
                    servers[key] = Server(key).start()
                for _ in range(rounds[name]):
                    for key in live:
                        one_round(name, servers[key], R["servers"].setdefault(key, {}), P)
                    save()
            finally:
                for srv in servers.values():
                    srv.stop()
        if "density" in scen:
            scen_density(R["density"]["results"], P, save)
            save()
        if "deflate" in scen:
            scen_deflate(R["deflate"]["results"], P, save)
            save()
        if "profile" in scen:
            log("== profiles (perf)")
            R["pyprofiles"] = [p for p in (scen_pyprofile(k, m, n, 4.0) for k in ("wsm-native", "ref") if k in keys
                                           for m, n in (("connect", 6000), ("echo", P["echo_n"]))) if p]
            R["profiles"] = [p for p in (scen_profile(k, P["profile_n"], 64, 3.0) for k in
                                         ("wsm-native", "floor-onesend") if k in keys) if p]
    finally:
        save(False)
    write_report(R, args)
    log(f"done in {(R[min(scen)] if merged else R)['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
