"""Build the ``wsmanager._core`` extension from ``csrc/*.c`` against the system wslay.

Debian's libwslay-dev ships no pkg-config file, so pkg-config is tried first and the plain
``-lwslay`` from the default search path is the fallback.
"""
import glob
import os
import shlex
import subprocess
import sys

from setuptools import Extension, setup


def _pkg_config(*args):
    try:
        out = subprocess.run(["pkg-config", *args, "libwslay"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(out)


cflags = _pkg_config("--cflags") or []
# The native engine (epoll, eventfd) is Linux-only; elsewhere its files compile to nothing and
# the registry works alone, without wslay.
libs = (_pkg_config("--libs") or ["-lwslay"]) if sys.platform.startswith("linux") else []
extra_compile = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden",
                 "-D_GNU_SOURCE"] + cflags
extra_link = list(libs) + ["-pthread"]
if os.environ.get("WSMANAGER_SANITIZE"):
    san = "-fsanitize=" + os.environ["WSMANAGER_SANITIZE"]
    extra_compile = [f for f in extra_compile if f != "-O2"] + ["-O1", "-g", "-fno-omit-frame-pointer", san]
    extra_link += [san]

setup(
    ext_modules=[
        Extension(
            "wsmanager._core",
            sources=sorted(glob.glob("csrc/*.c")),
            depends=sorted(glob.glob("csrc/*.h")),
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        )
    ]
)
