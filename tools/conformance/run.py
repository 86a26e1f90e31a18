"""Runs the Autobahn|Testsuite fuzzingclient against an echo endpoint served on 127.0.0.1 and
judges the result: ``make conformance`` (tools/conformance/setup.sh installs the suite first).

    .venv/bin/python tools/conformance/run.py [--cases 1-7,9,10,12,13] [--server native]

The echo endpoint is tests/hostile_support.py's ``/echo`` (a FastAPI route that sends back
every text and binary message as it came), started by the test suite's own launcher
(tests/servers.py ``AppServer``: a listening socket bound on a free 127.0.0.1 port and handed to
the server, readiness by an HTTP answer, stopped as a process group). ``--server``:

* ``native``     ``python -m wsmanager`` (the native plane with wsmanager's HTTP protocol);
* ``native-ws``  ``uvicorn --ws wsmanager.uvicorn:WebSocketProtocol`` (the native plane's
  WebSocket protocol under uvicorn's own HTTP protocol);
* ``uvicorn``    stock uvicorn, ``--ws websockets``; ``uvicorn-sansio``: ``--ws websockets-sansio``
  (uvicorn's ``auto`` since 0.50).

It writes the fuzzingclient spec (``failByDrop`` false, the suite's own default in its examples),
runs ``wstest -m fuzzingclient``, reads ``reports/index.json`` and prints one row per category:
passed / non-strict / informational / failed / unimplemented / missing (tools/conformance/
results.py says how a case is classed). Exit status 1 when a required category has a failed,
unimplemented or missing case (so permessage-deflate's categories 12 and 13 fail while the server
refuses the extension), 2 when the run itself could not be made. Everything goes to --out
(default build/conformance/SERVER/): spec.json, reports/ (the suite's HTML and JSON),
wstest.log, server.log, summary.md and summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import results  # noqa: E402  (tools/conformance/results.py)

APP = "tests.hostile_support:app"
PATH = "/echo"
SERVERS = {
    # name: (AppServer plane, via_main, extra command-line options, what it is)
    "native": ("native", True, [], "python -m wsmanager (native plane)"),
    "native-ws": ("native", False, [], "uvicorn --ws wsmanager.uvicorn:WebSocketProtocol (native plane)"),
    "uvicorn": ("uvicorn", False, ["--ws", "websockets"], "stock uvicorn --ws websockets"),
    "uvicorn-sansio": ("uvicorn", False, ["--ws", "websockets-sansio"], "stock uvicorn --ws websockets-sansio"),
}
DEFAULT_CASES = "1-7,9,10,12,13"

# The ids the spec selects, asked of the suite itself (its CaseSet resolves the patterns the
# same way the fuzzingclient does): a case absent from the report is then "missing".
_EXPECTED = """
import json, sys
from autobahntestsuite.case import Cases, CaseCategories, CaseSubCategories, CaseSetname, CaseBasename
from autobahntestsuite.caseset import CaseSet
spec = json.load(open(sys.argv[1]))
cs = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
print(json.dumps(cs.parseSpecCases(spec)))
"""


def log(msg: str) -> None:
    print(f"conformance: {msg}", flush=True)


def versions(tools: Path) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("wsmanager", "uvicorn", "websockets", "fastapi", "starlette"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    try:
        ab = subprocess.run([str(tools / "bin" / "wstest"), "-a"], capture_output=True, text=True, timeout=60)
        for line in ab.stdout.splitlines():
            name, _, ver = line.strip().rpartition(" ")
            if name:
                out[name] = ver
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def _rss_mib(pid: int) -> float:
    """The resident set of ``pid`` in MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _watch(proc: subprocess.Popen, t0: float, timeout: float, max_rss_mib: float,
           why: list[str]) -> None:
    """Kills ``proc`` past ``timeout`` seconds or ``max_rss_mib`` of memory, even while it prints
    nothing: a suite that hangs, or grows without bound against a misbehaving server (one run
    against a work-in-progress build reached 24 GiB and swapped the machine), must end the run."""
    while proc.poll() is None:
        rss = _rss_mib(proc.pid)
        if rss > max_rss_mib:
            why.append(f"its memory passed {max_rss_mib:.0f} MiB ({rss:.0f} MiB)")
        elif time.monotonic() - t0 > timeout:
            why.append(f"it ran past the {timeout:.0f} s timeout")
        if why:
            proc.kill()
            return
        time.sleep(0.5)


def run_wstest(tools: Path, spec: Path, log_path: Path, timeout: float,
               max_rss_mib: float) -> tuple[int | None, float, str]:
    """wstest -m fuzzingclient; its chatter goes to ``log_path``, a progress line every 50 cases.
    Returns its exit code (None: killed), the seconds it took and why it was killed."""
    t0 = time.monotonic()
    cmd = [str(tools / "bin" / "wstest"), "-m", "fuzzingclient", "-s", str(spec)]
    n = 0
    why: list[str] = []
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=spec.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        assert proc.stdout is not None
        watchdog = threading.Thread(target=_watch, args=(proc, t0, timeout, max_rss_mib, why), daemon=True)
        watchdog.start()
        for line in proc.stdout:
            logf.write(line)
            if line.startswith("Running test case ID"):
                n += 1
                if n % 50 == 0:
                    log(f"  {n} cases run ({time.monotonic() - t0:.0f} s), now {line.split()[4]}")
        rc: int | None = proc.wait()
        watchdog.join()
    return (None if why else rc), time.monotonic() - t0, "; ".join(why)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=os.environ.get("CONFORMANCE_CASES", DEFAULT_CASES),
                    help=f"required categories, e.g. 1-10 or 1-7,9,10,12,13 (default {DEFAULT_CASES})")
    ap.add_argument("--server", default="native", choices=sorted(SERVERS))
    ap.add_argument("--tools", type=Path, default=ROOT / ".venv-tools" / "autobahn",
                    help="the folder tools/conformance/setup.sh installed the suite into")
    ap.add_argument("--out", type=Path, help="output folder (default build/conformance/SERVER)")
    ap.add_argument("--timeout", type=float, default=2400.0, help="seconds for the whole wstest run")
    ap.add_argument("--max-rss-mib", type=float, default=4096.0,
                    help="wstest is killed past this much memory (MiB)")
    args = ap.parse_args(argv)

    try:
        categories = results.parse_categories(args.cases)
    except ValueError as exc:
        ap.error(str(exc))
    tools = args.tools.resolve()
    if not (tools / "bin" / "wstest").exists():
        log(f"{tools}/bin/wstest missing: run tools/conformance/setup.sh {tools} (make conformance-deps)")
        return 2
    out = (args.out or ROOT / "build" / "conformance" / args.server).resolve()
    reports = out / "reports"
    out.mkdir(parents=True, exist_ok=True)
    for old in reports.glob("*") if reports.exists() else ():
        old.unlink()

    from tests.servers import AppServer, ServerFailed

    plane, via_main, extra, what = SERVERS[args.server]
    agent = args.server
    server = AppServer(APP, plane, via_main=via_main, extra=extra, log_path=out / "server.log", start=False)
    try:
        server.start()
    except ServerFailed as exc:
        log(f"the server did not start: {exc}")
        return 2
    try:
        url = server.ws_url(PATH)
        spec = {"options": {"failByDrop": False}, "outdir": str(reports),
                "servers": [{"agent": agent, "url": url}],
                "cases": results.spec_cases(categories), "exclude-cases": [], "exclude-agent-cases": {}}
        spec_path = out / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        expected = json.loads(subprocess.run([str(tools / "bin" / "pypy"), "-c", _EXPECTED, str(spec_path)],
                                             capture_output=True, text=True, check=True).stdout)
        vers = versions(tools)
        log(f"Autobahn|Testsuite {vers.get('AutobahnTestSuite', '?')} fuzzingclient, {len(expected)} cases "
            f"of categories {args.cases} -> {what} at {url} ({APP})")
        log(f"  server: {' '.join(server.command)}")
        rc, took, killed = run_wstest(tools, spec_path, out / "wstest.log", args.timeout, args.max_rss_mib)
        alive = server.running
    finally:
        src = server.stop()
    log(f"wstest exited {rc if rc is not None else 'killed: ' + killed} after {took:.1f} s; "
        f"the server {'was still up' if alive else 'had died'} (stop: exit {src})")

    index_path = reports / "index.json"
    if not index_path.exists():
        log(f"no {index_path}: see {out / 'wstest.log'} and {out / 'server.log'}")
        per = results.tally({agent: {}}, agent, categories, expected)
    else:
        per = results.tally(results.load_index(index_path), agent, categories, expected)
    passes = results.passes(per) and alive and rc == 0
    table = results.table(per)
    print()
    print(f"{what}: Autobahn|Testsuite, categories {args.cases}")
    print(table)
    for line in results.notable(per):
        print(f"  {line}")
    print()
    (out / "summary.md").write_text(f"{what}, categories {args.cases}, {took:.0f} s\n\n{table}\n")
    (out / "summary.json").write_text(json.dumps({
        "server": args.server, "what": what, "categories": categories, "seconds": round(took, 1),
        "wstest_rc": rc, "server_alive": alive, "versions": vers,
        "per_category": {str(c): t.counts for c, t in per.items()},
        "total": results.total(per).counts, "passes": passes}, indent=2) + "\n")
    verdict = "OK" if passes else "FAILED"
    log(f"{verdict} ({args.server}, categories {args.cases}, {took:.0f} s): {results.summary_line(per)}; "
        f"report {reports / 'index.html'}")
    return 0 if passes else 1


if __name__ == "__main__":
    sys.exit(main())
