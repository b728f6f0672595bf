#!/usr/bin/env bash
# Checks deploy/systemd/elsinore.service offline, as CI does:
#   systemd-analyze verify   (syntax, unknown keys, ExecStart executable)
#   systemd-analyze security (exposure score; fails above THRESHOLD/100)
# Neither needs systemd as PID 1: the unit is checked inside a scratch root
# holding the unit, the binary at /usr/local/bin/elsinore, /bin/kill and
# systemd's own units. Usage: deploy/systemd/check.sh path/to/elsinore
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
bin="${1:?usage: check.sh path/to/elsinore}"
threshold="${THRESHOLD:-20}"   # 0-100; the unit scores 12 ("1.2 OK") with systemd 252
command -v systemd-analyze >/dev/null || { echo "systemd-analyze not found" >&2; exit 1; }
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin" "$root/etc/systemd/system" "$root/usr/lib/systemd" "$root/bin"
cp "$bin" "$root/usr/local/bin/elsinore"
cp /bin/kill "$root/bin/kill"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp "$here/elsinore.service" "$root/etc/systemd/system/elsinore.service"

# verify exits 0 on unknown keys (it only warns): any output is a failure.
out="$(systemd-analyze verify --root="$root" /etc/systemd/system/elsinore.service 2>&1)" || {
  echo "$out" >&2; echo "systemd-analyze verify failed" >&2; exit 1; }
if [ -n "$out" ]; then echo "$out" >&2; echo "systemd-analyze verify complained" >&2; exit 1; fi
echo "systemd-analyze verify: OK"

systemd-analyze security --offline=yes --root="$root" --threshold="$threshold" \
  --no-pager elsinore.service | tail -n 1
