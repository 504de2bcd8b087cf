#!/usr/bin/env bash
# The container engine of this machine and the flags it needs, as bash assignments for
# docker/build.sh and tests/containers.py:
#
#   eval "$(bash docker/engine.sh)"   # ENGINE_CMD=(podman --runtime runc) ENGINE_RUN_FLAGS=(...)
#
# Docker if its engine answers, else Podman ($ENGINE chooses). Podman on some container hosts
# (CI's machines) needs two settings its defaults get wrong there:
#   ulimits   podman asks the kernel for nofile/nproc limits above what the host may grant and
#             the container fails to start: pass the host's own hard limits (nproc no higher
#             than pid_max, which such hosts enforce)
#   runtime   crun refuses hybrid cgroups (v1 with a v2 mount at /sys/fs/cgroup/unified): runc
set -euo pipefail

engine=${ENGINE:-}
if [ -z "$engine" ]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
    elif command -v podman >/dev/null; then engine=podman
    else echo "engine.sh: neither a running Docker engine nor podman found" >&2; exit 1; fi
fi
cmd=("$engine") run=()
if [ "$engine" = podman ]; then
    if [ -d /sys/fs/cgroup/unified ] && command -v runc >/dev/null; then cmd+=(--runtime runc); fi
    nofile=$(ulimit -Hn) nproc=$(ulimit -Hu) pid_max=$(cat /proc/sys/kernel/pid_max)
    [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ] && nproc=$pid_max
    [ "$nofile" = unlimited ] && nofile=1048576
    run=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
fi
echo "ENGINE_CMD=(${cmd[*]})"
echo "ENGINE_RUN_FLAGS=(${run[*]})"
