#!/usr/bin/env bash
# Builds a stand-in for the Dockerfile's base image (python:3.11-slim) where no image registry can
# be reached, and tags it as $1 in the container storage that buildah uses.
#
# It has the layout the Dockerfile relies on, as in the official image: Debian bookworm (minbase)
# with CPython 3.11 installed under /usr/local, `python`/`pip` on PATH, pip and setuptools from
# ensurepip, CA certificates, tzdata, and groupadd/useradd. The CPython is this machine's own build
# (the interpreter running this script, without its site-packages), so nothing is compiled here.
# Needs root, debootstrap, buildah and a reachable Debian mirror (the one apt uses).
set -euo pipefail
tag=${1:?usage: scripts/image-base.sh TAG}
work=$(mktemp -d /var/tmp/eventrouter-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs

# The mirror apt already uses (deb822 or one-line sources), so no host is written down here.
mirror=$(sed -n -E 's/^URIs:[[:space:]]*([^[:space:]]+).*/\1/p; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]]+bookworm[[:space:]].*/\2/p' \
  /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | grep -v security | head -n1 || true)
[ -n "$mirror" ] || { echo "image-base: no Debian mirror found in apt's sources" >&2; exit 1; }

# The shared libraries CPython's extension modules link against, as the official image installs.
libs=ca-certificates,netbase,tzdata,libssl3,libffi8,libsqlite3-0,libbz2-1.0,libreadline8,libncursesw6
libs=$libs,libexpat1,liblzma5,zlib1g,libuuid1,libgdbm6,libdb5.3,libnsl2,libtirpc3
debootstrap --variant=minbase --include="$libs" bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }

prefix=$(python3 -c 'import sys; print(sys.base_prefix)')
version=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$version" = 3.11 ] || { echo "image-base: needs CPython 3.11 (found $version at $prefix)" >&2; exit 1; }
[ "$prefix" != /usr ] || { echo "image-base: $prefix is the distribution's Python; needs a /usr/local-style build" >&2; exit 1; }
# bin/ holds the scripts of every package installed here too: only the interpreter goes in.
tar -C "$prefix" --exclude="./lib/python$version/site-packages/*" --exclude="./lib/python$version/test" \
  --exclude='__pycache__' --exclude='./bin' -cf - . | tar -C "$rootfs/usr/local" -xf -
mkdir -p "$rootfs/usr/local/bin"
cp -L "$prefix/bin/python$version" "$rootfs/usr/local/bin/"
# No Tk in a slim image.
rm -f "$rootfs/usr/local/lib/python$version/lib-dynload/"_tkinter*.so
chroot "$rootfs" /sbin/ldconfig
# Every extension module must load inside the image, not only on this machine.
missing=$(chroot "$rootfs" sh -c "ldd /usr/local/lib/python$version/lib-dynload/*.so /usr/local/bin/python$version" | grep 'not found' || true)
[ -z "$missing" ] || { echo "image-base: libraries missing in the stand-in: $missing" >&2; exit 1; }
chroot "$rootfs" "/usr/local/bin/python$version" -m ensurepip --default-pip >/dev/null
ln -sf "python$version" "$rootfs/usr/local/bin/python3"
ln -sf python3 "$rootfs/usr/local/bin/python"
ln -sf pip3 "$rootfs/usr/local/bin/pip"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
chroot "$rootfs" python -c 'import ssl, sqlite3, ctypes, lzma, bz2, zlib, readline' # as a real slim image can

tar -C "$rootfs" -cf "$work/rootfs.tar" .
cat >"$work/Containerfile" <<EOF
FROM scratch
ADD rootfs.tar /
ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 PYTHON_VERSION=$version
LABEL org.opencontainers.image.description="stand-in for python:$version-slim (scripts/image-base.sh)"
CMD ["python3"]
EOF
buildah build --quiet --isolation chroot -f "$work/Containerfile" -t "$tag" "$work" >/dev/null
echo "image-base: built $tag from Debian bookworm and CPython $version ($prefix)"
