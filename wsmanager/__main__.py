"""``python -m wsmanager app:app [uvicorn options]``: uvicorn with the native WebSocket plane.

Every uvicorn option works; ``--ws`` defaults to ``wsmanager.uvicorn:WebSocketProtocol``.
"""
from __future__ import annotations

import sys

NATIVE_WS = "wsmanager.uvicorn:WebSocketProtocol"


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--ws" or a.startswith("--ws=") for a in args):
        args = ["--ws", NATIVE_WS, *args]
    from uvicorn.main import main as uvicorn_cli  # the click command behind `uvicorn`

    uvicorn_cli.main(args=args, prog_name="python -m wsmanager")


if __name__ == "__main__":
    main()
