#!/usr/bin/env bash
# Put the NATTEN wheel that matches the torch of the active virtualenv into directory $1.
# Used by docker/ray.Dockerfile; reads FLAVOR, NATTEN_VERSION, NATTEN_WHEEL_INDEX,
# NATTEN_CUDA_ARCH and NATTEN_N_WORKERS from the environment (the Dockerfile's build args).
#
# cpu: NATTEN's pure-Python build (no libnatten; its CPU forward is what ditsweep tests against).
# gpu: NATTEN's prebuilt wheel for this torch/CUDA pair if its wheel index has one, otherwise
#      libnatten compiled from the source distribution with the CUDA toolkit of the build image.
#      Either way the wheel must carry libnatten: without it NATTEN would silently run unfused
#      kernels on the GPU, so that is a build failure here.
set -euo pipefail

out=$1
mkdir -p "$out"

if [ "$FLAVOR" = cpu ]; then
    # The source build imports torch, hence no build isolation (an isolated build would
    # download another torch, a CUDA one of several GB).
    pip wheel --no-deps --no-build-isolation --wheel-dir "$out" "natten==${NATTEN_VERSION}"
    exit 0
fi

# NATTEN tags its wheels with torch's minor version and torch's CUDA version: torch 2.14.1
# built for CUDA 13.0 -> natten==0.21.7+torch2140cu130.
tag=$(python -c 'import torch; major, minor = torch.__version__.split("+")[0].split(".")[:2]; print(f"torch{major}{minor}0cu{torch.version.cuda.replace(".", "")}")')

if pip download --no-deps --only-binary=:all: --dest "$out" \
        --find-links "$NATTEN_WHEEL_INDEX" "natten==${NATTEN_VERSION}+${tag}"; then
    echo "install-natten: prebuilt natten ${NATTEN_VERSION}+${tag}"
else
    echo "install-natten: no prebuilt natten ${NATTEN_VERSION}+${tag} at ${NATTEN_WHEEL_INDEX};" \
         "compiling libnatten for compute capabilities ${NATTEN_CUDA_ARCH}"
    NATTEN_CUDA_ARCH="$NATTEN_CUDA_ARCH" \
    NATTEN_N_WORKERS="${NATTEN_N_WORKERS:-$(( ($(nproc) + 1) / 2 ))}" \
        pip wheel --no-deps --no-build-isolation --no-binary natten --wheel-dir "$out" \
            "natten==${NATTEN_VERSION}"
fi

python - "$out" <<'PY'
import pathlib, sys, zipfile
wheels = sorted(pathlib.Path(sys.argv[1]).glob("natten-*.whl"))
assert len(wheels) == 1, f"expected one natten wheel, found {wheels}"
names = zipfile.ZipFile(wheels[0]).namelist()
if not any(n.startswith("natten/libnatten") and n.endswith(".so") for n in names):
    sys.exit(f"{wheels[0].name} has no libnatten: NATTEN would not use fused kernels on GPU")
print(f"install-natten: {wheels[0].name} carries libnatten")
PY
