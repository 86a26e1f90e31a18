#!/usr/bin/env bash
# Sets up the Autobahn|Testsuite (autobahntestsuite 25.10.1 from PyPI, unmodified) in a private
# folder: `tools/conformance/setup.sh [DIR]` (default .venv-tools/autobahn). Idempotent: every
# step checks its result first and does only what is missing, so a second run does nothing.
#
# The suite runs on Python 2.7 only. Its interpreter is Debian bullseye's PyPy 2.7 (7.3.3): the
# .deb files are fetched with apt-get from a private apt configuration (a bullseye source, lists,
# cache and an empty dpkg status, all under DIR/apt: the system's apt sources and dpkg database
# are neither read for candidates nor changed) and unpacked with dpkg-deb -x into DIR/pypy,
# together with the two bullseye libraries bookworm no longer has (libffi7, libssl1.1) and
# libssl-dev 1.1 for building cryptography. pip 20.3.4 (the last pip for Python 2) bootstraps
# itself from its PyPI wheel; the suite and its pins then install with it into DIR/pypy's own
# site directory (DIR/pypy/usr/local/lib/pypy2.7/dist-packages), one package at a time only when
# missing, with --no-deps (the pins below are the whole closure the suite imports).
#
# wstest imports twisted.internet.ssl (pyOpenSSL -> cryptography, built here against
# OpenSSL 1.1) and autobahn's WAMP test module (unittest2) at start-up even for plain ws://, and
# its report module needs Jinja2: those are in the pins too.
#
# DIR/bin/pypy and DIR/bin/wstest are the entry points (they set LD_LIBRARY_PATH to the private
# libraries). Needs: apt-get, dpkg-deb, a C compiler (`make conformance-deps` installs the Debian
# packages first), network access to Debian's mirror and PyPI. HOST_PYTHON: a Python 3 with pip,
# used once to download pip's wheel (default python3). DEBIAN_BULLSEYE_URI: the mirror.
set -euo pipefail

DIR=$(mkdir -p "${1:-.venv-tools/autobahn}" && cd "${1:-.venv-tools/autobahn}" && pwd)
HOST_PYTHON=${HOST_PYTHON:-python3}
MIRROR=${DEBIAN_BULLSEYE_URI:-http://deb.debian.org/debian}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
ROOT=$DIR/pypy
LIBDIR=$ROOT/usr/lib/x86_64-linux-gnu
PYPY_BIN=$ROOT/usr/bin/pypy
DEBS="pypy pypy-lib pypy-dev libffi7 libssl1.1 libssl-dev"
PIP_VERSION=20.3.4

# Installed in this order, each group with pip's --no-deps: build tools first (the sdists below
# build with them, --no-build-isolation), then the pure-Python pins (incremental before Twisted,
# whose setup_requires would otherwise fetch a Python-3-only incremental), then the sdists.
STAGE_TOOLS="setuptools==44.1.1 wheel==0.37.1"
STAGE_PURE="six==1.17.0 enum34==1.1.10 ipaddress==1.0.23 incremental==16.10.1 constantly==15.1.0
  attrs==19.3.0 Automat==0.8.0 hyperlink==19.0.0 idna==2.8 txaio==2.1.0 MarkupSafe==1.1.1
  Jinja2==2.11.3 linecache2==1.0.0 traceback2==1.4.0 unittest2==1.1.0"
STAGE_BUILT="zope.interface==4.6.0 Twisted==19.10.0 cryptography==3.3.2 pyOpenSSL==20.0.1
  autobahn==0.10.9 autobahntestsuite==25.10.1"

say() { echo "conformance-setup: $*"; }

case "$(uname -m)" in
  x86_64) ;;
  *) say "only x86_64 is supported (the bullseye libraries are taken from x86_64-linux-gnu)"; exit 1 ;;
esac

# ---- 1. PyPy 2.7 from Debian bullseye, unpacked privately -------------------------------------
pypy_ok() {
  [ -x "$PYPY_BIN" ] && LD_LIBRARY_PATH=$LIBDIR "$PYPY_BIN" -c 'import ssl, zlib, ctypes, sqlite3' 2>/dev/null
}

if pypy_ok; then
  say "PyPy present: $ROOT"
else
  command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
    || { say "apt-get and dpkg-deb are needed (Debian)"; exit 1; }
  [ -r "$KEYRING" ] || { say "$KEYRING missing: apt-get install debian-archive-keyring"; exit 1; }
  APT=$DIR/apt
  mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/sources.list.d" "$DIR/debs"
  echo "deb [signed-by=$KEYRING] $MIRROR bullseye main" > "$APT/sources.list"
  : > "$APT/status"  # an empty dpkg database: the candidates are bullseye's, whatever is installed
  APT_OPTS=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=$APT/sources.list.d"
            -o "Dir::State::Lists=$APT/lists" -o "Dir::State::status=$APT/status"
            -o "Dir::Cache=$APT/cache" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root"
            -o "Acquire::Languages=none" -q)
  missing=""
  for p in $DEBS; do compgen -G "$DIR/debs/${p}_*.deb" >/dev/null || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    say "downloading bullseye packages:$missing"
    apt-get "${APT_OPTS[@]}" update >/dev/null  # a source it cannot reach is only a warning here
    (cd "$DIR/debs" && apt-get "${APT_OPTS[@]}" download $missing >/dev/null) \
      || { say "could not download$missing from $MIRROR bullseye (DEBIAN_BULLSEYE_URI: another mirror)"; exit 1; }
    rm -rf "$APT/lists" "$APT/cache"  # 17 MB of bullseye indexes, needed for this download only
  fi
  rm -rf "$ROOT"
  mkdir -p "$ROOT"
  for p in $DEBS; do dpkg-deb -x "$(compgen -G "$DIR/debs/${p}_*.deb" | head -1)" "$ROOT"; done
  notfound=$(LD_LIBRARY_PATH=$LIBDIR ldd "$ROOT/usr/lib/pypy/bin/pypy-c" "$ROOT/usr/lib/pypy/bin/libpypy-c.so" \
             | grep "not found" | sort -u || true)
  if [ -n "$notfound" ]; then
    say "libraries PyPy needs are missing from the system (make conformance-deps installs them):"
    echo "$notfound"
    exit 1
  fi
  pypy_ok || { say "the unpacked PyPy does not start"; exit 1; }
  say "PyPy unpacked into $ROOT"
fi

# ---- 2. the entry points -------------------------------------------------------------------------
mkdir -p "$DIR/bin"
for tool in pypy wstest; do
  target='"$ROOT/usr/bin/pypy"'
  [ "$tool" = wstest ] && target='"$ROOT/usr/bin/pypy" "$ROOT/usr/local/bin/wstest"'
  cat > "$DIR/bin/$tool.new" <<EOF
#!/bin/sh
# $tool of the private Autobahn|Testsuite set-up (tools/conformance/setup.sh).
ROOT="$ROOT"
LD_LIBRARY_PATH="\$ROOT/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" \\
PYTHONWARNINGS="\${PYTHONWARNINGS:-ignore}" exec $target "\$@"
EOF
  chmod +x "$DIR/bin/$tool.new"
  mv -f "$DIR/bin/$tool.new" "$DIR/bin/$tool"
done
PYPY=$DIR/bin/pypy

# ---- 3. pip 20.3.4, bootstrapped from its own wheel ----------------------------------------------
if "$PYPY" -m pip --version 2>/dev/null | grep -q "^pip $PIP_VERSION "; then
  say "pip $PIP_VERSION present"
else
  mkdir -p "$DIR/wheels"
  whl=$DIR/wheels/pip-$PIP_VERSION-py2.py3-none-any.whl
  [ -f "$whl" ] || "$HOST_PYTHON" -m pip download -q --no-deps --only-binary :all: -d "$DIR/wheels" "pip==$PIP_VERSION"
  # --no-compile: pip 20.3 asserts on PyPy's .pyc locations when it byte-compiles a wheel.
  "$PYPY" "$whl/pip" install -q --no-compile --no-index --no-warn-script-location "$whl" 2>&1 \
    | grep -v "DEPRECATION: Python 2.7" || true
  "$PYPY" -m pip --version | grep -q "^pip $PIP_VERSION " || { say "pip bootstrap failed"; exit 1; }
  say "pip $PIP_VERSION installed"
fi

# ---- 4. the suite and its pins: only what is missing ---------------------------------------------
# The requirements of a group that pkg_resources does not find satisfied, one a line.
missing_of() {
  "$PYPY" - "$@" <<'EOF'
import sys
try:
    import pkg_resources
except ImportError:  # no setuptools yet: everything is missing
    print("\n".join(sys.argv[1:])); sys.exit(0)
for req in sys.argv[1:]:  # the distribution itself, not its declared dependencies (--no-deps)
    try:
        found = pkg_resources.working_set.find(pkg_resources.Requirement.parse(req))
    except pkg_resources.VersionConflict:
        found = None
    if found is None:
        print(req)
EOF
}

# cryptography's C part is built against bullseye's OpenSSL 1.1 (headers and libraries in ROOT).
export CFLAGS="-I$ROOT/usr/include -I$ROOT/usr/include/x86_64-linux-gnu ${CFLAGS:-}"
export LDFLAGS="-L$LIBDIR ${LDFLAGS:-}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONWARNINGS=ignore
# shellcheck disable=SC2086
if [ -z "$(missing_of $STAGE_TOOLS $STAGE_PURE $STAGE_BUILT | tr -d '[:space:]')" ]; then
  say "the suite and its $(echo $STAGE_TOOLS $STAGE_PURE $STAGE_BUILT | wc -w) pins are installed"
  exit 0
fi
for stage in "$STAGE_TOOLS" "$STAGE_PURE" "$STAGE_BUILT"; do
  # shellcheck disable=SC2086
  need=$(missing_of $stage | tr '\n' ' ')
  [ -n "${need// /}" ] || continue
  say "installing:$(printf ' %s' $need)"
  # shellcheck disable=SC2086
  "$PYPY" -m pip install -q --no-compile --no-deps --no-build-isolation --no-warn-script-location $need 2>&1 \
    | grep -v "DEPRECATION: Python 2.7\|is ignored: it is neither a file nor a directory" || true
  # shellcheck disable=SC2086
  left=$(missing_of $stage | tr '\n' ' ')
  [ -z "${left// /}" ] || { say "still missing after pip install: $left"; exit 1; }
done

versions=$("$DIR/bin/wstest" -a 2>&1) || { echo "$versions"; say "wstest does not start"; exit 1; }
say "ready in ${SECONDS} s: $(echo "$versions" | tr '\n' ' ')($DIR/bin/wstest)"
