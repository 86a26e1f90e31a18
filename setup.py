"""Build the ``wsmanager._core`` extension from ``csrc/*.c`` against the system wslay.

Debian's libwslay-dev ships no pkg-config file, so pkg-config is tried first and the plain
``-lwslay`` from the default search path is the fallback. Before compiling, ``build_ext`` checks
with the same compiler and flags that ``<wslay/wslay.h>`` compiles and ``-lwslay`` links, and
stops with the package to install when it does not (``wslay_problem``).
"""
import glob
import os
import shlex
import subprocess
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


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

WSLAY_MISSING = """\
wsmanager: cannot build its native extension, wslay was not found ({problem}).
wslay is the WebSocket library the native engine is built on. Install its development files,
then build again:
    Debian, Ubuntu:   apt-get install libwslay-dev
    Fedora, RHEL:     dnf install wslay-devel
    Alpine:           apk add wslay-dev
    Homebrew:         brew install wslay
A wslay installed under another prefix: CFLAGS=-I<prefix>/include LDFLAGS=-L<prefix>/lib
(A wheel from PyPI has wslay bundled and needs none of this.)
{output}"""

_WSLAY_PROBE = """\
#include <wslay/wslay.h>
int (*wsmanager_wslay_probe)(wslay_event_context_ptr *, const struct wslay_event_callbacks *,
                             void *) = wslay_event_context_server_init;
"""


def wslay_problem(compiler, ext):
    """``None`` when ``<wslay/wslay.h>`` compiles and ``-lwslay`` links as a shared object with
    ``compiler`` (a customized distutils compiler) and ``ext``'s flags; else ``(what failed,
    the compiler's output)``. The compiler's output is kept out of the terminal meanwhile."""
    with tempfile.TemporaryDirectory(prefix="wsmanager-wslay-") as tmp:
        src = os.path.join(tmp, "wslay_probe.c")
        with open(src, "w") as f:
            f.write(_WSLAY_PROBE)
        log = os.path.join(tmp, "log")
        saved = [os.dup(1), os.dup(2)]
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o600)
        what = None
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            try:
                what = "<wslay/wslay.h> does not compile"
                objs = compiler.compile([src], output_dir=tmp, include_dirs=ext.include_dirs,
                                        extra_postargs=ext.extra_compile_args)
                what = "-lwslay does not link"
                compiler.link_shared_object(objs, os.path.join(tmp, "probe.so"),
                                            libraries=["wslay", *ext.libraries],
                                            library_dirs=ext.library_dirs,
                                            # undefined symbols are errors here: a libwslay
                                            # without wslay's functions does not pass
                                            extra_postargs=[*ext.extra_link_args, "-Wl,-z,defs"])
                what = None
            except Exception:  # CompileError, LinkError, a missing compiler
                pass
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for d in (*saved, fd):
                os.close(d)
        if what is None:
            return None
        with open(log, errors="replace") as f:
            return what, f.read()


class BuildExt(build_ext):
    """build_ext that checks for wslay before compiling anything (Linux: the engine needs it)."""

    def build_extensions(self):
        if sys.platform.startswith("linux"):
            for ext in self.extensions:
                problem = wslay_problem(self.compiler, ext)
                if problem:
                    what, output = problem
                    tail = "".join(f"    | {line}\n" for line in output.strip().splitlines()[-6:])
                    sys.exit(WSLAY_MISSING.format(
                        problem=what, output=f"The compiler said:\n{tail}" if tail else ""))
        super().build_extensions()


setup(
    cmdclass={"build_ext": BuildExt},
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
