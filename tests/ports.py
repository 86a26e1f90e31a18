"""Free TCP ports on 127.0.0.1 for the servers the tests start.

A plain ``bind(("127.0.0.1", 0))`` + close hands back a port that is free *now*; the kernel may
hand the same port to the next ``bind(0)`` (another server of the same test) before the first
server has bound it, and then one server dies with EADDRINUSE while the other answers on both
URLs (a CI run saw four servers answer with three pids). Two guards:

* the port is left in TIME_WAIT (one accepted connection, closed from the listening side first):
  the kernel does not hand a port with a TIME_WAIT socket to ``bind(0)`` or to ``connect()``,
  while a server that sets SO_REUSEADDR (uvicorn, redis-server, the benchmark floors) binds it;
* a port is never handed out twice by this process.
"""
from __future__ import annotations

import socket

_issued: set[int] = set()


def _reserve() -> int:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server side closes first: its end keeps the port in TIME_WAIT
    return port


def free_port() -> int:
    """A port on 127.0.0.1 that no other server of this test run was given."""
    for _ in range(100):
        port = _reserve()
        if port not in _issued:
            _issued.add(port)
            return port
    raise RuntimeError("no fresh port after 100 tries")
