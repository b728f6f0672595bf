#!/usr/bin/env bash
# Builds the Elsinore container image from this checkout:
#   deploy/container/build.sh [TAG]         (default localhost/elsinore:dev)
# 1. cargo build --release (skipped when ELSINORE_BIN names a built binary),
# 2. stages a root file system: the binary, every shared library `ldd`
#    lists, the dynamic loader, /etc/passwd and /etc/group for uid 65532,
# 3. builds deploy/container/Containerfile on it (FROM scratch: no registry).
# CONTAINER_ENGINE picks the engine (default: podman with the runc runtime
# and cgroupfs manager, which is what works on the CI machines, see
# deploy/lib.sh; set CONTAINER_ENGINE=docker elsewhere). Prints the image
# size at the end.
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
tag="${1:-localhost/elsinore:dev}"
engine="${CONTAINER_ENGINE:-${PODMAN[*]}}"

bin="${ELSINORE_BIN:-}"
if [ -z "$bin" ]; then
  (cd "$repo" && cargo build --release --locked -p elsinore-gateway --bin elsinore)
  bin="$repo/target/release/elsinore"
fi
[ -x "$bin" ] || { echo "build.sh: no executable at $bin" >&2; exit 1; }

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
root="$stage/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc" "$stage/cache"
# Debug info is not needed to run; panics still print their message.
objcopy --strip-debug "$bin" "$root/usr/local/bin/elsinore" 2>/dev/null \
  || cp "$bin" "$root/usr/local/bin/elsinore"

# Shared libraries and the loader, at the paths the binary asks for. A
# static binary (ldd: "not a dynamic executable") needs none.
libs="$(ldd "$bin" 2>/dev/null | awk '
  $2 == "=>" && $3 ~ /^\// { print $3 }
  $1 ~ /^\// { print $1 }' | sort -u)" || true
if [ -n "$libs" ]; then
  while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done <<<"$libs"
fi
interp="$(readelf -l "$bin" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')"
if [ -n "$interp" ] && [ ! -e "$root$interp" ]; then
  mkdir -p "$root$(dirname "$interp")"
  cp -L "$interp" "$root$interp"
fi

cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/nonexistent:/nonexistent
elsinore:x:65532:65532:Elsinore gateway:/var/lib/elsinore:/nonexistent
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
elsinore:x:65532:
GROUP
# getaddrinfo (peer names, backends): /etc/hosts first, then DNS.
echo 'hosts: files dns' >"$root/etc/nsswitch.conf"

$engine build --quiet -f "$here/Containerfile" -t "$tag" "$stage" >/dev/null
size="$($engine image inspect --format '{{.Size}}' "$tag")"
echo "built $tag: $size bytes ($(( size / 1024 / 1024 )) MiB); files:"
(cd "$root" && find . -type f -printf '  /%P %s\n' | sort)
