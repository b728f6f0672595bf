# shellcheck shell=bash
# Sourced by the scripts under deploy/ (not run on its own), after their
# `set -euo pipefail`:
#   here     the directory of the script that sources this file
#   repo     the root of this checkout
#   PODMAN   podman as it must be called on the CI machines: the default
#            runtime (crun) refuses their hybrid cgroup layout ("cgroups in
#            hybrid mode not supported"), runc with the cgroupfs manager
#            works. Every podman command needs both flags.
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PODMAN=(podman --runtime runc --cgroup-manager=cgroupfs)
