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
asks the suite which case ids it selects and runs them in batches, one ``wstest -m
fuzzingclient`` process each, all against the one server (results.py ``batches()``): every case
outside categories 12 and 13 in one, then per subcategory of 12 and 13 its small cases in one
and each of its large cases (``LARGE_CASES``: 12.*.10-18, 13.*.10-18) in one of its own. The
suite itself keeps the zlib objects of every compressed message: in one process it grows to tens
of GiB over 12 and 13. ``--timeout`` bounds the whole run (a batch gets what is left of it, the
batches after it are not run), ``--max-rss-mib`` each wstest process. The batches' index.json
are merged into one, and that gives one row per category: passed / non-strict / informational /
failed / unimplemented / missing (tools/conformance/results.py says how a case is classed). Exit
status 1 when a required category has a failed, unimplemented or missing case or a wstest
process did not exit 0, 2 when the run itself could not be made. Everything goes to --out
(default build/conformance/SERVER/): spec.json (the whole selection), server.log, summary.md and
summary.json (also per batch: its cases, seconds, peak memory, exit), reports/index.json (the
merged index; its ``reportfile`` names lead into the batch folders), reports/index.html (a link
to each batch's report) and reports/batch-N/ (batch N's spec.json and wstest.log, and the
suite's own HTML and JSON report).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
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


def _status_mib(pid: int, key: str) -> float:
    """A memory figure of ``pid`` from /proc/PID/status (``VmRSS``: resident now, ``VmHWM``: its
    peak so far) in MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class WstestRun:
    """One wstest process: its exit code (None: killed), the seconds it took, why it was killed,
    the peak of its resident memory (as last seen, every 0.5 s) and how many cases it began."""
    rc: int | None = None
    seconds: float = 0.0
    killed: str = ""
    peak_rss_mib: float = 0.0
    cases_run: int = 0


def _watch(proc: subprocess.Popen, deadline: float, max_rss_mib: float, run: WstestRun,
           why: list[str]) -> None:
    """Kills ``proc`` past the ``deadline`` (time.monotonic()) or ``max_rss_mib`` of memory, even
    while it prints nothing: a suite that hangs, or grows without bound against a misbehaving
    server (one run against a work-in-progress build reached 24 GiB and swapped the machine),
    must end the run. Keeps ``run.peak_rss_mib`` up to date."""
    while proc.poll() is None:
        rss = _status_mib(proc.pid, "VmRSS")
        run.peak_rss_mib = max(run.peak_rss_mib, rss, _status_mib(proc.pid, "VmHWM"))
        if rss > max_rss_mib:
            why.append(f"its memory passed {max_rss_mib:.0f} MiB ({rss:.0f} MiB)")
        elif time.monotonic() > deadline:
            why.append("it ran past the whole run's timeout")
        if why:
            proc.kill()
            return
        time.sleep(0.5)


def run_wstest(tools: Path, spec: Path, log_path: Path, deadline: float, max_rss_mib: float,
               t0: float, before: int) -> WstestRun:
    """wstest -m fuzzingclient; its chatter goes to ``log_path``, a progress line every 50 cases
    of the whole run (``before``: the cases earlier batches began, ``t0``: when the first began)."""
    run = WstestRun()
    start = time.monotonic()
    cmd = [str(tools / "bin" / "wstest"), "-m", "fuzzingclient", "-s", str(spec)]
    why: list[str] = []
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=spec.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        assert proc.stdout is not None
        watchdog = threading.Thread(target=_watch, args=(proc, deadline, max_rss_mib, run, why), daemon=True)
        watchdog.start()
        for line in proc.stdout:
            logf.write(line)
            if line.startswith("Running test case ID"):
                run.cases_run += 1
                if (before + run.cases_run) % 50 == 0:
                    log(f"  {before + run.cases_run} cases run ({time.monotonic() - t0:.0f} s), "
                        f"now {line.split()[4]}")
        rc = proc.wait()
        watchdog.join()
    run.rc, run.seconds, run.killed = (None if why else rc), time.monotonic() - start, "; ".join(why)
    return run


def _ids(ids: list[str]) -> str:
    """A batch's cases in a few words: "12.1.10", or "301: 1.1.1 ... 10.1.1"."""
    return ids[0] if len(ids) == 1 else f"{len(ids)}: {ids[0]} ... {ids[-1]}"


def _runs(n: int) -> str:
    return f"{n} wstest run{'' if n == 1 else 's'}"


def _exit(run: WstestRun | None) -> str:
    return "not run" if run is None else str(run.rc) if run.rc is not None else f"killed: {run.killed}"


def _batch_index_html(folders: list[str], plan: list[list[str]]) -> str:
    """reports/index.html: a link to each batch's own report (the suite's index.html)."""
    rows = "".join(f'<li><a href="{f}/index.html">{f}</a>: {_ids(ids)}</li>\n' for f, ids in zip(folders, plan))
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Autobahn|Testsuite batches</title>"
            f"</head><body>\n<p>One wstest process per batch; the merged results: "
            f'<a href="index.json">index.json</a>.</p>\n<ul>\n{rows}</ul>\n</body></html>\n')


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=os.environ.get("CONFORMANCE_CASES", DEFAULT_CASES),
                    help=f"required categories, e.g. 1-10 or 1-7,9,10,12,13 (default {DEFAULT_CASES})")
    ap.add_argument("--server", default="native", choices=sorted(SERVERS))
    ap.add_argument("--tools", type=Path, default=ROOT / ".venv-tools" / "autobahn",
                    help="the folder tools/conformance/setup.sh installed the suite into")
    ap.add_argument("--out", type=Path, help="output folder (default build/conformance/SERVER)")
    ap.add_argument("--timeout", type=float, default=2400.0, help="seconds for the whole run (all batches)")
    ap.add_argument("--max-rss-mib", type=float, default=4096.0,
                    help="a wstest process is killed past this much memory (MiB)")
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
    if reports.exists():
        shutil.rmtree(reports)
    reports.mkdir()
    (out / "wstest.log").unlink(missing_ok=True)  # left by a run of one wstest process for all

    from tests.servers import AppServer, ServerFailed

    plane, via_main, extra, what = SERVERS[args.server]
    agent = args.server
    server = AppServer(APP, plane, via_main=via_main, extra=extra, log_path=out / "server.log", start=False)
    try:
        server.start()
    except ServerFailed as exc:
        log(f"the server did not start: {exc}")
        return 2
    runs: list[WstestRun] = []
    try:
        url = server.ws_url(PATH)
        spec = {"options": {"failByDrop": False}, "outdir": str(reports),
                "servers": [{"agent": agent, "url": url}],
                "cases": results.spec_cases(categories), "exclude-cases": [], "exclude-agent-cases": {}}
        spec_path = out / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        expected = json.loads(subprocess.run([str(tools / "bin" / "pypy"), "-c", _EXPECTED, str(spec_path)],
                                             capture_output=True, text=True, check=True).stdout)
        plan = results.batches(expected)
        folders = [f"batch-{i}" for i in range(1, len(plan) + 1)]
        vers = versions(tools)
        log(f"Autobahn|Testsuite {vers.get('AutobahnTestSuite', '?')} fuzzingclient, {len(expected)} cases "
            f"of categories {args.cases} in {_runs(len(plan))} -> {what} at {url} ({APP})")
        log(f"  server: {' '.join(server.command)}")
        t0 = time.monotonic()
        for folder, ids in zip(folders, plan):
            where = reports / folder
            where.mkdir()
            batch_spec = {**spec, "outdir": str(where), "cases": ids}
            (where / "spec.json").write_text(json.dumps(batch_spec, indent=2) + "\n")
            run = run_wstest(tools, where / "spec.json", where / "wstest.log", t0 + args.timeout,
                             args.max_rss_mib, t0, sum(r.cases_run for r in runs))
            runs.append(run)
            if run.rc != 0:
                log(f"  {folder} ({_ids(ids)}) exited {_exit(run)} after {run.seconds:.1f} s: "
                    f"see {where / 'wstest.log'}")
            if not server.running or time.monotonic() - t0 > args.timeout:
                break
        alive = server.running
    finally:
        src = server.stop()
    took = time.monotonic() - t0
    peak = max((r.peak_rss_mib for r in runs), default=0.0)
    wstest_ok = len(runs) == len(plan) and all(r.rc == 0 for r in runs)
    log(f"{len(runs)} of {_runs(len(plan))} made, {'all exited 0' if wstest_ok else 'not all exited 0'}, "
        f"after {took:.1f} s (peak wstest memory {peak:.0f} MiB); the server "
        f"{'was still up' if alive else 'had died'} (stop: exit {src})")

    parts = {f: results.load_index(reports / f / "index.json")
             for f in folders if (reports / f / "index.json").exists()}
    missing = [f for f, _ in zip(folders, runs) if f not in parts]
    if missing:
        log(f"no index.json in {', '.join(missing)}: see their wstest.log and {out / 'server.log'}")
    if len(runs) < len(plan):
        log(f"{folders[len(runs)]} to {folders[-1]} not run: "
            f"{'the server had died' if not alive else 'the timeout had passed'}")
    index = results.merge_indexes(parts)
    index.setdefault(agent, {})
    (reports / "index.json").write_text(json.dumps(index, indent=3, sort_keys=True) + "\n")
    (reports / "index.html").write_text(_batch_index_html(folders, plan))
    per = results.tally(index, agent, categories, expected)
    passes = results.passes(per) and alive and wstest_ok
    table = results.table(per)
    print()
    print(f"{what}: Autobahn|Testsuite, categories {args.cases}")
    print(table)
    for line in results.notable(per):
        print(f"  {line}")
    print()
    ran: list[WstestRun | None] = [*runs, *[None] * (len(plan) - len(runs))]
    batch_rows = "\n".join(
        f"| {f} | {_ids(ids)} | {f'{r.seconds:.0f}' if r else '-'} "
        f"| {f'{r.peak_rss_mib:.0f}' if r else '-'} | {_exit(r)} |" for f, ids, r in zip(folders, plan, ran))
    (out / "summary.md").write_text(
        f"{what}, categories {args.cases}, {took:.0f} s, {_runs(len(plan))} "
        f"(peak wstest memory {peak:.0f} MiB)\n\n{table}\n\n"
        f"Reports: reports/index.json (all cases, merged), reports/index.html (a link to each batch's "
        f"report); reports/batch-N/ holds batch N's spec.json, wstest.log and the suite's own HTML and "
        f"JSON (index.html, one file per case).\n\n"
        f"| batch | cases | seconds | peak MiB | wstest exit |\n"
        f"| --- | --- | ---: | ---: | --- |\n{batch_rows}\n")
    (out / "summary.json").write_text(json.dumps({
        "server": args.server, "what": what, "categories": categories, "seconds": round(took, 1),
        "wstest_ok": wstest_ok, "server_alive": alive, "versions": vers,
        "batches": [{"folder": f, "cases": ids, "ran": r is not None,
                     **({"rc": r.rc, "killed": r.killed, "seconds": round(r.seconds, 1),
                         "peak_rss_mib": round(r.peak_rss_mib)} if r else {})}
                    for f, ids, r in zip(folders, plan, ran)],
        "per_category": {str(c): t.counts for c, t in per.items()},
        "total": results.total(per).counts, "passes": passes}, indent=2) + "\n")
    verdict = "OK" if passes else "FAILED"
    log(f"{verdict} ({args.server}, categories {args.cases}, {took:.0f} s): {results.summary_line(per)}; "
        f"report {reports / 'index.html'}, {out / 'summary.md'}")
    return 0 if passes else 1


if __name__ == "__main__":
    sys.exit(main())
