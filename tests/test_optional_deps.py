"""`pip install wsmanager` without extras: the router works without prometheus_client, and its
/metrics route says which extra to install."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WITHOUT_PROMETHEUS = textwrap.dedent('''
    import logging, sys
    logging.basicConfig(level=logging.WARNING)
    sys.modules["prometheus_client"] = None      # `import prometheus_client` raises ImportError
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from wsmanager import WebSocketManager
    from wsmanager.fastapi import metrics_registry, router

    manager = WebSocketManager(ping_interval=0)
    app = FastAPI()
    app.include_router(router(manager))
    client = TestClient(app)
    stats = client.get("/ws/stats")
    metrics = client.get("/metrics")
    print(stats.status_code, metrics.status_code)
    print(metrics.text.strip())
    try:
        metrics_registry(manager)
    except ImportError as e:
        print("ImportError:", e)
''')


def test_router_without_prometheus_client() -> None:
    run = subprocess.run([sys.executable, "-c", WITHOUT_PROMETHEUS], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    codes, body, error = run.stdout.strip().splitlines()
    assert codes == "200 501", run.stdout
    assert "pip install 'wsmanager[metrics]'" in body
    assert error.startswith("ImportError:") and "wsmanager[metrics]" in error
    assert "wsmanager[metrics]" in run.stderr  # the one WARNING when the router is built
