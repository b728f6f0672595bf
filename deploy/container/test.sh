#!/usr/bin/env bash
# End-to-end test of the container image on this machine (podman, no
# registry): two gateways of two meshes in two containers on a podman
# network created here with an explicit private subnet, run read-only as
# the image's non-root user, certificates minted with the image's own
# `elsinore certs init` and mounted read-only. The test asserts that:
#   - the image has no shell and runs as uid 65532, read-only root fs
#     without podman's writable tmpfs on /tmp, /var/tmp and /run;
#   - `elsinore check` accepts each config inside the container;
#   - the gateways exchange catalogs (each /catalog lists the other's export),
#     mesh-b's DNS listener answers the imported name;
#   - a request from the host to mesh-b's egress reaches mesh-a's backend
#     through mesh-a's ingress over mTLS. The scratch image can run nothing
#     but elsinore, so mesh-a exports its own admin listener as the backend:
#     the reply is mesh-a's /catalog document, which only mesh-a can serve;
#   - imports are written to the cache volume (the only writable path).
# Everything it creates is named elsinore-ctest-<pid>-* and removed on exit.
#
#   IMAGE=localhost/elsinore:dev deploy/container/test.sh
# (deploy/container/build.sh builds that image.) Fails if podman is missing.
set -euo pipefail
. "$(dirname "$0")/../lib.sh"

image="${IMAGE:-localhost/elsinore:dev}"
subnet_prefix="${SUBNET_PREFIX:-10.213.77}"   # a /24 that only this test uses

fail() { echo "container test FAILED: $*" >&2; exit 1; }
command -v podman >/dev/null || fail "podman is not installed (apt-get install podman runc)"
command -v runc >/dev/null || fail "runc is not installed (apt-get install runc)"
command -v curl >/dev/null || fail "curl is not installed"
"${PODMAN[@]}" image exists "$image" || fail "image $image not found; run deploy/container/build.sh first"

# Limits at or below the hard limits: podman asks for more by default and
# the sandbox may not raise them (see CONTAINERS.md).
hard_limit() { local v; v="$(ulimit -H "$1")"; [ "$v" = unlimited ] && v="$2"; [ "$v" -gt "$2" ] && v="$2"; echo "$v"; }
nofile="$(hard_limit -n 4096)"
nproc="$(hard_limit -u 1024)"
RUN=(run --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")

name="elsinore-ctest-$$"
net="$name-net"
tmp="$(mktemp -d)"
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    for m in a b; do
      "${PODMAN[@]}" container exists "$name-$m" 2>/dev/null || continue
      echo "--- logs of $name-$m" >&2
      "${PODMAN[@]}" logs "$name-$m" 2>&1 | tail -n 40 >&2 || true
    done
  fi
  "${PODMAN[@]}" rm -f -t 0 "$name-a" "$name-b" >/dev/null 2>&1 || true
  "${PODMAN[@]}" network rm -f "$net" >/dev/null 2>&1 || true
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT INT TERM

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

echo "--- image $image"
size="$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$image")"
echo "image size: $size bytes ($((size / 1024 / 1024)) MiB)"
user="$("${PODMAN[@]}" image inspect --format '{{.Config.User}}' "$image")"
[ "$user" = "65532:65532" ] || fail "image user is '$user', expected 65532:65532"
if "${PODMAN[@]}" "${RUN[@]}" --rm --entrypoint /bin/sh "$image" -c true >/dev/null 2>&1; then
  fail "the image has a shell"
fi
echo "no shell; USER $user"
"${PODMAN[@]}" "${RUN[@]}" --rm --read-only "$image" --version

"${PODMAN[@]}" network create --subnet "$subnet_prefix.0/24" "$net" >/dev/null
declare -A ip=([a]="$subnet_prefix.11" [b]="$subnet_prefix.12")

# Certificates, minted by the image itself (as its user, into a directory
# it may write), then laid out per gateway without the CA keys.
for m in a b; do
  mkdir -p "$tmp/$m/ca" "$tmp/$m/etc/certs" "$tmp/$m/etc/peers" "$tmp/$m/cache"
  chown 65532:65532 "$tmp/$m/ca" "$tmp/$m/cache"
  "${PODMAN[@]}" "${RUN[@]}" --rm --read-only --network none -v "$tmp/$m/ca:/out" "$image" \
    certs init --trust-domain "mesh-$m.test" --out /out --dns "$name-$m" --ip "${ip[$m]}" >/dev/null
  cp "$tmp/$m/ca/gateway.pem" "$tmp/$m/ca/gateway.key" "$tmp/$m/etc/certs/"
done
cp "$tmp/b/ca/ca.pem" "$tmp/a/etc/peers/mesh-b.pem"
cp "$tmp/a/ca/ca.pem" "$tmp/b/etc/peers/mesh-a.pem"

config() { # mesh other export
  cat <<EOF
mesh: { name: mesh-$1, trustDomain: mesh-$1.test }
identity: { certificate: certs/gateway.pem, privateKey: certs/gateway.key }
listeners:
  federation: "0.0.0.0:8008"
  admin: "0.0.0.0:15000"
  ingress: "0.0.0.0:15443"
  egress: "0.0.0.0:15001"
  dns: "0.0.0.0:15053"
advertise: { address: $name-$1, port: 15443 }
exports:
  # The gateway's own admin listener stands in for an app: the image runs
  # nothing else.
  - name: $3
    protocol: HTTP
    port: 8080
    backends: ["127.0.0.1:15000"]
    peers: [mesh-$2]
peers:
  - name: mesh-$2
    trustDomain: mesh-$2.test
    trustBundle: peers/mesh-$2.pem
    federation: "$name-$2:8008"
imports:
  cacheDir: /var/lib/elsinore
EOF
}
config a b status >"$tmp/a/etc/elsinore.yaml"
config b a info >"$tmp/b/etc/elsinore.yaml"
# The gateway's user must read its key: the owner, mode 0400, as a
# Kubernetes Secret with defaultMode and fsGroup would arrange.
for m in a b; do
  chown -R 65532:65532 "$tmp/$m/etc"
  chmod 0400 "$tmp/$m/etc/certs/gateway.key"
done

echo "--- elsinore check inside the image"
for m in a b; do
  "${PODMAN[@]}" "${RUN[@]}" --rm --read-only --network none \
    -v "$tmp/$m/etc:/etc/elsinore:ro" "$image" check
done

echo "--- two gateways on $net ($subnet_prefix.0/24)"
for m in a b; do
  "${PODMAN[@]}" "${RUN[@]}" -d --name "$name-$m" --hostname "$name-$m" \
    --network "$net" --ip "${ip[$m]}" \
    --read-only --read-only-tmpfs=false --cap-drop ALL --security-opt no-new-privileges \
    -v "$tmp/$m/etc:/etc/elsinore:ro" -v "$tmp/$m/cache:/var/lib/elsinore" \
    -p 127.0.0.1::15000 -p 127.0.0.1::15001 -p 127.0.0.1::15053/udp \
    -e ELSINORE_LOG=info "$image" >/dev/null
done
port_of() { "${PODMAN[@]}" port "$name-$1" "$2" | head -n1 | sed 's/.*://'; }
declare -A admin egress dns
for m in a b; do
  admin[$m]="127.0.0.1:$(port_of "$m" 15000/tcp)"
  egress[$m]="127.0.0.1:$(port_of "$m" 15001/tcp)"
  dns[$m]="127.0.0.1:$(port_of "$m" 15053/udp)"
done

echo "--- runs as non-root with a read-only root file system"
for m in a b; do
  pid="$("${PODMAN[@]}" inspect --format '{{.State.Pid}}' "$name-$m")"
  uids="$(awk '/^Uid:/ {print $2, $3, $4, $5}' "/proc/$pid/status")"
  [ "$uids" = "65532 65532 65532 65532" ] || fail "$name-$m runs with Uid: $uids"
  ro="$("${PODMAN[@]}" inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$name-$m")"
  [ "$ro" = true ] || fail "$name-$m root file system is not read-only ($ro)"
  # Nothing writable but the cache volume: no tmpfs mounts.
  if awk '$3 == "tmpfs" {print $2}' "/proc/$pid/mounts" | grep -Eq '^/(tmp|var/tmp|run)$'; then
    fail "$name-$m has a writable tmpfs: $(awk '$3 == "tmpfs" {print $2}' "/proc/$pid/mounts" | tr '\n' ' ')"
  fi
  echo "$name-$m: pid $pid Uid $uids, ReadonlyRootfs $ro"
done

echo "--- catalogs exchanged"
ready() { curl -fsS --max-time 5 "http://$1/ready" >/dev/null 2>&1; }
imported() { curl -fsS --max-time 5 "http://$1/catalog" 2>/dev/null | grep -q "\"fqdn\": \"$2\""; }
for m in a b; do
  wait_for 60 ready "${admin[$m]}" || fail "$name-$m not ready: $(curl -sS "http://${admin[$m]}/ready" || true)"
done
wait_for 60 imported "${admin[b]}" status.mesh-a.global || fail "mesh-b did not import status.mesh-a.global: $(curl -sS "http://${admin[b]}/catalog")"
wait_for 60 imported "${admin[a]}" info.mesh-b.global || fail "mesh-a did not import info.mesh-b.global: $(curl -sS "http://${admin[a]}/catalog")"
echo "mesh-b imports status.mesh-a.global; mesh-a imports info.mesh-b.global"

echo "--- DNS: mesh-b answers the imported name"
vip_of() {
  # An A query over UDP with this image's `elsinore resolve`, from the
  # container's own network namespace (the published UDP port is reached
  # from the host as well; the container is what apps in a pod would use).
  "${PODMAN[@]}" "${RUN[@]}" --rm --read-only --network "container:$name-b" "$image" \
    resolve status.mesh-a.global --dns 127.0.0.1:15053 2>/dev/null
}
vip="$(wait_for 30 vip_of >/dev/null && vip_of)" || fail "mesh-b's DNS did not answer status.mesh-a.global"
echo "status.mesh-a.global -> $vip (mesh-b's VIP)"

echo "--- a request from mesh-b's egress to mesh-a's backend"
request() {
  curl -fsS --max-time 10 --connect-to "::${egress[b]}" http://status.mesh-a.global:8080/catalog
}
body="$(wait_for 30 request >/dev/null && request)" || fail "request through mesh-b's egress failed: $(request 2>&1 || true)"
grep -q '"mesh": "mesh-a"' <<<"$body" || fail "the reply is not mesh-a's catalog: $body"
echo "reply from mesh-a: $(grep -m1 '"mesh"' <<<"$body" | tr -d ' ')"
served="$(curl -fsS "http://${admin[a]}/metrics" | awk '/^elsinore_ingress_http_requests_total/ {n += $NF} END {print n + 0}')"
[ "$served" -gt 0 ] || fail "mesh-a's ingress counted no HTTP request"
echo "mesh-a ingress served $served HTTP request(s)"

echo "--- imports cached in the volume (the only writable path)"
ls -A "$tmp/b/cache" | grep -q . || fail "mesh-b wrote nothing to its cache volume"
ls -l "$tmp/b/cache"

echo "container test OK (image $image, $size bytes)"
