"""Build the ``wsmanager._core`` extension from ``csrc/*.c`` against the system wslay and zlib.

Debian's libwslay-dev ships no pkg-config file, so pkg-config is tried first and the plain
``-lwslay`` from the default search path is the fallback. zlib (permessage-deflate) is ``-lz``.
Before compiling, ``build_ext`` checks with the same compiler and flags that ``<wslay/wslay.h>``
compiles and ``-lwslay`` links, then the same for ``<zlib.h>`` and ``-lz``, and stops with the
package to install when one does not (``library_problem``).
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
libs = (_pkg_config("--libs") or ["-lwslay"]) + ["-lz"] if sys.platform.startswith("linux") else []
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

ZLIB_MISSING = """\
wsmanager: cannot build its native extension, zlib was not found ({problem}).
zlib compresses and decompresses permessage-deflate messages on the native plane. Install its
development files, then build again:
    Debian, Ubuntu:   apt-get install zlib1g-dev
    Fedora, RHEL:     dnf install zlib-devel
    Alpine:           apk add zlib-dev
    Homebrew:         brew install zlib
A zlib installed under another prefix: CFLAGS=-I<prefix>/include LDFLAGS=-L<prefix>/lib
(A wheel from PyPI links the system's libz.so.1, which every manylinux system has.)
{output}"""

# (header, library, probe source, message) of each library the engine needs, checked in order.
_PROBES = (
    ("<wslay/wslay.h>", "wslay", """\
#include <wslay/wslay.h>
int (*wsmanager_wslay_probe)(wslay_event_context_ptr *, const struct wslay_event_callbacks *,
                             void *) = wslay_event_context_server_init;
""", WSLAY_MISSING),
    ("<zlib.h>", "z", """\
#include <zlib.h>
int (*wsmanager_zlib_probe)(z_streamp, int) = inflate;
""", ZLIB_MISSING),
)


def library_problem(compiler, ext, header, library, source):
    """``None`` when ``header`` compiles and ``-l<library>`` links as a shared object with
    ``compiler`` (a customized distutils compiler) and ``ext``'s flags; else ``(what failed,
    the compiler's output)``. The compiler's output is kept out of the terminal meanwhile."""
    # the other libraries' -l flags stay out: each probe names only the library it is about
    others = [a for a in ext.extra_link_args if not (a.startswith("-l") and a[2:] != library)]
    with tempfile.TemporaryDirectory(prefix=f"wsmanager-{library}-") as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
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
                what = f"{header} does not compile"
                objs = compiler.compile([src], output_dir=tmp, include_dirs=ext.include_dirs,
                                        extra_postargs=ext.extra_compile_args)
                what = f"-l{library} does not link"
                compiler.link_shared_object(objs, os.path.join(tmp, "probe.so"),
                                            libraries=[library, *ext.libraries],
                                            library_dirs=ext.library_dirs,
                                            # undefined symbols are errors here: a library
                                            # without its functions does not pass
                                            extra_postargs=[*others, "-Wl,-z,defs"])
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
    """build_ext that checks for wslay and zlib before compiling anything (Linux: the engine
    needs them)."""

    def build_extensions(self):
        if sys.platform.startswith("linux"):
            for ext in self.extensions:
                for header, library, source, message in _PROBES:
                    problem = library_problem(self.compiler, ext, header, library, source)
                    if problem:
                        what, output = problem
                        tail = "".join(f"    | {line}\n" for line in output.strip().splitlines()[-6:])
                        sys.exit(message.format(
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
