#!/usr/bin/env bash
# make wheel: the sdist, then from it a wheel for one Python, repaired into a manylinux wheel
# with libwslay bundled (zlib is linked, not bundled: libz.so.1 is on the manylinux whitelist).
#
#   tools/build-wheel.sh PYTHON TOOLS_VENV GLIBC PLATFORM [DIST]
#
# The extension is compiled and linked by `zig cc -target <arch>-linux-gnu.<GLIBC>`: zig links
# against stubs of that glibc's symbol versions, so the wheel asks for what glibc GLIBC offers and
# not for this machine's newer versions (gcc here binds pthread_create & co. to GLIBC_2.34).
# zig's target mode ignores /usr/include, so wslay's header directory and zlib's two headers are
# handed to it alone; the system libwslay is the one linked, and `auditwheel repair` copies it
# into the wheel (wsmanager.libs/) and points the extension's RUNPATH at it.
set -euo pipefail

py=$1 tools=$(realpath "$2") glibc=$3 plat=$4 dist=${5:-dist}
arch=$(uname -m)
tag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
zig=$("$tools/bin/python" -c 'import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))')
raw=build/wheel-raw/$tag
inc=$PWD/build/wheel-include
rm -rf "$raw" "$inc"
mkdir -p "$raw" "$inc" "$dist"

# Where this machine's compiler finds wslay and zlib (nothing found: setup.py says what to
# install).
cflags="-I$inc" ldflags=""
header=$(echo '#include <wslay/wslay.h>' | cpp -H -o /dev/null 2>&1 | sed -n 's/^\. //p' | head -n1) || true
if [ -n "$header" ]; then
    ln -s "$(dirname "$header")" "$inc/wslay"
fi
for h in zlib.h zconf.h; do
    header=$(echo "#include <$h>" | cpp -H -o /dev/null 2>&1 | sed -n 's/^\. //p' | head -n1) || true
    if [ -n "$header" ]; then
        ln -s "$header" "$inc/$h"
    fi
done
for name in wslay z; do
    lib=$(gcc -print-file-name=lib$name.so)
    if [ "$lib" != lib$name.so ]; then
        ldflags="$ldflags -L$(dirname "$(realpath "$lib")")"
    fi
done

target="$arch-linux-gnu.$glibc"
echo "building the sdist and a $tag wheel (zig cc -target $target)"
CC="$zig cc -target $target" LDSHARED="$zig cc -target $target -shared" \
CFLAGS="$cflags" LDFLAGS="$ldflags" \
    "$py" -m build --quiet --outdir "$raw" .

# Every libc function must come with the version it was linked at: an unversioned one would be
# looked up by name at run time and might not exist on a glibc as old as the tag promises.
# zlib's are unversioned (Debian's libz.so.1 has no symbol versions) and exist in every zlib
# since 1.2.0: deflate*/inflate* are let through.
so=$(mktemp -d)
trap 'rm -rf "$so"' EXIT
unzip -q -d "$so" "$raw"/wsmanager-*.whl 'wsmanager/_core*.so'
loose=$(nm -D --undefined-only "$so"/wsmanager/_core*.so | awk '$1 == "U" && $2 !~ /@/ {print $2}' |
        grep -v -E '^_?Py|^wslay_|^(deflate|inflate)[A-Za-z0-9_]*$' || true)
if [ -n "$loose" ]; then
    echo "unversioned undefined symbols in the extension (not from Python, wslay or zlib):" $loose >&2
    exit 1
fi

cp "$raw"/wsmanager-*.tar.gz "$dist"/
rm -f "$dist"/wsmanager-*-"$tag"-"$tag"-*.whl
PATH="$tools/bin:$PATH" auditwheel repair --plat "$plat" --strip -w "$dist" "$raw"/wsmanager-*.whl
wheel=$(ls "$dist"/wsmanager-*-"$tag"-"$tag"-*.whl)
PATH="$tools/bin:$PATH" auditwheel show "$wheel"
echo "$wheel ($(du -k "$wheel" | cut -f1) KiB)"
