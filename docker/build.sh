#!/usr/bin/env bash
# Build ditsweep's images with Docker or Podman, whichever this machine has:
#
#   docker/build.sh [options] [cpu] [gpu] [mlflow]      (default: all three)
#
#   ditsweep-ray:TAG-cpu     docker/ray.Dockerfile, FLAVOR=cpu: the Ray head, laptops
#   ditsweep-ray:TAG-gpu     docker/ray.Dockerfile, FLAVOR=gpu: the Ray workers
#   ditsweep-mlflow:VERSION  docker/mlflow.Dockerfile: the tracking server
#
# Options:
#   --tag TAG               Ray images' tag prefix (default 0.1.0)
#   --registry PREFIX       name the images PREFIX/ditsweep-... (default: no prefix)
#   --base auto|debian|registry
#                           auto (default): the Dockerfiles' public base images if the registry
#                           answers, else `debian`: a Debian base made here with debootstrap
#                           (root; DEBIAN_SUITE, DEBIAN_MIRROR) and used for every image; the
#                           gpu image then needs CUDA bases (--build-arg GPU_BUILD_IMAGE=...) and
#                           is skipped without them
#   --extra-ca FILE         a PEM bundle the builds trust besides the bases' CAs (a TLS proxy's)
#   --inception-weights FILE
#                           torch-fidelity's Inception weights from this file, not downloaded
#   --build-arg NAME=VALUE  passed to every build (base images, TORCH_INDEX_URL, ...)
#
# Files named by --extra-ca and --inception-weights are copied to docker/local/, which the build
# context takes. Podman gets the settings some hosts need: host networking for builds, the host's
# ulimits (podman's defaults exceed what a container host may grant) and runc on hybrid cgroups
# (crun refuses them). It prints each image's build time and size.
set -euo pipefail

cd "$(dirname "$0")/.."
to_local() {  # copy file $1 into the build context as docker/local/$2
    [ "$(realpath "$1")" = "$(realpath "docker/local/$2")" ] || cp "$1" "docker/local/$2"
}
tag=0.1.0 registry="" base=auto images=() build_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag=$2; shift 2 ;;
        --registry) registry="${2%/}/"; shift 2 ;;
        --base) base=$2; shift 2 ;;
        --extra-ca) to_local "$2" extra-ca.pem
                    build_args+=(--build-arg EXTRA_CA_CERTS=docker/local/extra-ca.pem); shift 2 ;;
        --inception-weights) to_local "$2" inception.pth
                    build_args+=(--build-arg INCEPTION_FILE=docker/local/inception.pth); shift 2 ;;
        --build-arg) build_args+=(--build-arg "$2"); shift 2 ;;
        cpu|gpu|mlflow) images+=("$1"); shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ ${#images[@]} -gt 0 ] || images=(cpu gpu mlflow)

# --- the engine ------------------------------------------------------------------------------
eval "$(bash docker/engine.sh)"
engine=("${ENGINE_CMD[@]}") build_flags=()
if [ "${engine[0]}" = podman ]; then build_flags=(--network host "${ENGINE_RUN_FLAGS[@]}"); fi

host_mirror() {  # the Debian mirror this host's apt uses (so a build behind a mirror needs no flag)
    sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1 | awk '{print $1}'
}

arg_default() {  # the default of build argument $2 in Dockerfile $1
    sed -n "s/^ARG $2=//p" "$1" | head -1 | tr -d '"'
}

# --- the bases -------------------------------------------------------------------------------
ubuntu=$(arg_default docker/ray.Dockerfile UBUNTU_VERSION)
default_base=$(arg_default docker/ray.Dockerfile CPU_BASE_IMAGE | sed "s/\${UBUNTU_VERSION}/$ubuntu/")
if [ "$base" = auto ]; then
    if "${engine[@]}" pull -q "$default_base" >/dev/null 2>&1; then base=registry; else
        echo "build.sh: $default_base cannot be pulled: building on a Debian base made with debootstrap"
        base=debian
    fi
fi
if [ "$base" = debian ]; then
    suite=${DEBIAN_SUITE:-bookworm}
    debian="localhost/ditsweep-debian:$suite"
    if ! "${engine[@]}" image inspect "$debian" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || { echo "build.sh: install debootstrap (apt-get install debootstrap)" >&2; exit 1; }
        root=$(mktemp -d /var/tmp/ditsweep-debian.XXXXXX)
        start=$SECONDS
        debootstrap --variant=minbase "$suite" "$root" "${DEBIAN_MIRROR:-$(host_mirror)}" >"$root.log" 2>&1 \
            || { tail -20 "$root.log" >&2; exit 1; }
        tar -C "$root" --numeric-owner -c . | "${engine[@]}" import --change 'CMD ["/bin/bash"]' - "$debian" >/dev/null
        rm -rf "$root" "$root.log"
        echo "build.sh: $debian made in $((SECONDS - start)) s"
    fi
    build_args=(--build-arg "CPU_BASE_IMAGE=$debian" --build-arg "BASE_IMAGE=$debian" "${build_args[@]}")
    if [[ " ${images[*]} " == *" gpu "* && " ${build_args[*]} " != *"GPU_BUILD_IMAGE="* ]]; then
        echo "build.sh: skipping the gpu image: no CUDA base images (pass --build-arg GPU_BUILD_IMAGE=... and GPU_RUNTIME_IMAGE=...)"
        images=("${images[@]/gpu}")
    fi
elif [ "$base" != registry ]; then
    echo "build.sh: --base must be auto, debian or registry" >&2; exit 2
fi

# --- the builds ------------------------------------------------------------------------------
report=()
build() {  # build NAME DOCKERFILE [ARGS...]
    local name=$1 file=$2 start=$SECONDS
    shift 2
    echo "build.sh: building $name"
    "${engine[@]}" build "${build_flags[@]}" "${build_args[@]}" "$@" -f "$file" -t "$name" .
    local bytes
    bytes=$("${engine[@]}" image inspect --format '{{.Size}}' "$name")
    report+=("$(awk -v n="$name" -v s=$((SECONDS - start)) -v b="$bytes" 'BEGIN { printf "%-36s %5d s %6.2f GB", n, s, b / 1e9 }')")
}
for image in "${images[@]}"; do
    case "$image" in
        cpu|gpu) build "${registry}ditsweep-ray:$tag-$image" docker/ray.Dockerfile --build-arg "FLAVOR=$image" ;;
        "") ;;
        mlflow) build "${registry}ditsweep-mlflow:$(arg_default docker/mlflow.Dockerfile MLFLOW_VERSION)" docker/mlflow.Dockerfile ;;
    esac
done
printf 'build.sh: %s\n' "${report[@]}"
