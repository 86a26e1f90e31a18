"""The seed 003 endpoint with the one changed import -- the very router of
``examples/seed_endpoint/app.py`` -- plus the measurement routes of ``benchmarks/benchprobe.py``.
Run it on either plane:

    uvicorn benchmarks.wsm_app:app                                            # portable plane
    uvicorn benchmarks.wsm_app:app --ws wsmanager.uvicorn:WebSocketProtocol   # native plane

The manager is configured by WSMANAGER_* variables (the benchmark driver sets
WSMANAGER_MAX_CONNECTIONS_PER_USER=0).
"""
from __future__ import annotations

from fastapi import FastAPI

from examples.seed_endpoint.app import router
from wsmanager import ws_manager

try:
    from . import benchprobe
except ImportError:  # run as a top-level module
    import benchprobe  # type: ignore[no-redef]

app = FastAPI(title="wsmanager benchmark endpoint")
app.include_router(router, prefix="/api/v1")
benchprobe.install(app, ws_manager.get_stats)
