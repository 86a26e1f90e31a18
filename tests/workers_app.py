"""The app the worker-model tests serve with several processes (tests/test_workers.py).

``FastAPI(lifespan=...)`` starts ``ws_manager`` with each worker, which is when the manager
looks for sibling workers. Each WebSocket is told which process serves it and whether the native
engine does (``"wsmanager.native"`` in the scope's extensions). ``wsmanager`` logs to stderr
with the process id; ``WSM_TEST_RECHECK_AFTER`` shortens the manager's second look at start-up.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from wsmanager import _procs, ws_manager

_procs.RECHECK_AFTER = float(os.environ.get("WSM_TEST_RECHECK_AFTER", _procs.RECHECK_AFTER))
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s pid=%(process)d %(message)s"))
_log = logging.getLogger("wsmanager")
_log.addHandler(_handler)
_log.setLevel(logging.DEBUG)
_log.propagate = False


@asynccontextmanager
async def lifespan(app):
    async with ws_manager.lifespan(app):
        _log.info("workers_app started (backend %s)", ws_manager.get_stats()["backend"]["type"])
        yield


app = FastAPI(lifespan=lifespan)


@app.websocket("/ws")
async def endpoint(websocket: WebSocket, cid: str):
    if not await ws_manager.connect(websocket, cid):
        return
    try:
        await websocket.send_json({"pid": os.getpid(),
                                   "native": "wsmanager.native" in (websocket.scope.get("extensions") or {})})
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        pass
    finally:
        await ws_manager.disconnect(cid)
