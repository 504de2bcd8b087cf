# The Ray images of ditsweep, built from the repository root (see cluster/README.md):
#
#   docker build -f docker/ray.Dockerfile --build-arg FLAVOR=gpu -t REGISTRY/ditsweep-ray:0.1.0-gpu .
#   docker build -f docker/ray.Dockerfile --build-arg FLAVOR=cpu -t REGISTRY/ditsweep-ray:0.1.0-cpu .
#
# gpu: the Ray workers. CUDA 13.0 (the build of the pinned torch: torch 2.14.1 on PyPI is
#      2.14.1+cu130), torch from PyTorch's cu130 index, and NATTEN with libnatten, so neighborhood
#      attention runs NATTEN's fused kernels on the GPU.
# cpu: the Ray head (it runs the Tune driver, no trials) and laptops. torch's CPU wheel and
#      NATTEN's pure-Python build; ditsweep uses its own CPU attention there.
#
# Both flavours come from this one file and share every step but the base image, the torch
# index and the NATTEN build: Ray refuses a node whose Ray or Python version (to the patch
# level) differs from the head's, so the head and the workers must get the same Ubuntu Python
# and the same wheels.
#
# The images run exactly what the README runs: `python -m ditsweep.run SWEEP.yaml`. The working
# directory holds the repository's sweeps/, so `sweeps/placement.yaml` resolves as in a clone.
# No credentials are baked in: S3 keys and the database password come from a Kubernetes Secret
# at run time.

# Versions. The defaults must equal the pins in pyproject.toml (tests/test_deploy.py checks
# them, and the build checks the installed versions again at the end).
ARG FLAVOR=gpu
ARG UBUNTU_VERSION=24.04
ARG CUDA_VERSION=13.0.2
ARG TORCH_CUDA=cu130
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG NATTEN_VERSION=0.21.7
# NATTEN publishes wheels per torch minor and CUDA pair (natten==V+torch2130cu130 for torch 2.13
# and CUDA 13.0) at this index. When it has none for the installed torch, libnatten is compiled
# from the source distribution for these GPU architectures (compute capabilities; add 10.0 for
# B200, 12.0 for RTX 50xx): each one adds build time, so list only the cluster's GPUs.
ARG NATTEN_WHEEL_INDEX=https://whl.natten.org
ARG NATTEN_CUDA_ARCH="8.0;8.6;8.9;9.0"
# Parallel compile jobs for that fallback (empty: half the build machine's cores). NATTEN's
# kernels need a few GB of memory per job.
ARG NATTEN_N_WORKERS=
# torch-fidelity's Inception weights (the URL torch-fidelity 0.4.0 itself downloads from).
ARG INCEPTION_URL=https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
ARG USER_UID=1000

# Base images per flavour. "build" compiles (CUDA toolkit with nvcc for libnatten); "runtime"
# only runs. torch's wheels bring their own CUDA libraries, the runtime image adds the CUDA
# runtime a source-built libnatten links against.
FROM ubuntu:${UBUNTU_VERSION} AS cpu-build
FROM ubuntu:${UBUNTU_VERSION} AS cpu-runtime
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS gpu-build
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS gpu-runtime


# ---- deps: a virtualenv with every dependency of ditsweep, ditsweep itself excluded ----------
FROM ${FLAVOR}-build AS deps
ARG FLAVOR
ARG TORCH_CUDA
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG NATTEN_VERSION
ARG NATTEN_WHEEL_INDEX
ARG NATTEN_CUDA_ARCH
ARG NATTEN_N_WORKERS
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev build-essential cmake ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# setuptools, wheel and build: NATTEN and ditsweep are built without build isolation below.
RUN pip install --upgrade pip setuptools wheel build

# torch first, from PyTorch's index for the flavour (cu130 or cpu), so that nothing later pulls
# another build of it.
RUN channel=$([ "$FLAVOR" = gpu ] && echo "$TORCH_CUDA" || echo cpu) \
 && pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
      --index-url "https://download.pytorch.org/whl/${channel}"

# NATTEN next, against that torch (its source build imports torch, hence no build isolation).
COPY docker/install-natten.sh /tmp/install-natten.sh
RUN bash /tmp/install-natten.sh /tmp/natten \
 && pip install --no-deps /tmp/natten/natten-*.whl \
 && rm -rf /tmp/natten

# Then the rest of pyproject.toml's [project].dependencies, read from the file itself so the
# image cannot drift from it (ray[default,tune]: "default" brings the dashboard and job server
# that KubeRay's head, job submitter and autoscaler use).
COPY docker/pyproject_deps.py /opt/ditsweep/pyproject_deps.py
COPY pyproject.toml /opt/ditsweep/pyproject.toml
RUN python /opt/ditsweep/pyproject_deps.py requirements /opt/ditsweep/pyproject.toml > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt


# ---- the image --------------------------------------------------------------------------------
FROM ${FLAVOR}-runtime AS image
ARG FLAVOR
ARG INCEPTION_URL
ARG USER_UID
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# python3: the same Ubuntu Python the venv was made with. g++ and python3-dev: torch.compile
# (Inductor, Triton) compiles C at run time. wget: KubeRay's health probes and job submitter
# call it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev g++ wget ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# A non-root user with the uid Ray's own images use (Ubuntu's default "ubuntu" user has it).
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid "${USER_UID}" --user-group --shell /bin/bash ray

# The FID feature extractor's weights: downloaded once here, never at run time (clusters and CI
# machines may have no route to GitHub). ditsweep reads the path from this variable.
ENV DITSWEEP_INCEPTION_WEIGHTS=/opt/ditsweep/weights/weights-inception-2015-12-05-6726825d.pth
RUN mkdir -p "$(dirname "$DITSWEEP_INCEPTION_WEIGHTS")" \
 && wget -q -O "$DITSWEEP_INCEPTION_WEIGHTS" "$INCEPTION_URL"

COPY --from=deps /opt/venv /opt/venv
COPY --from=deps /opt/ditsweep /opt/ditsweep
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv
# The weights load into torch-fidelity's extractor (a truncated or wrong file fails the build),
# and on GPU the NATTEN wheel carries libnatten (checked by file: loading it needs a driver).
RUN python -c "import os; from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as F; F('inception-v3-compat', ['2048'], feature_extractor_weights_path=os.environ['DITSWEEP_INCEPTION_WEIGHTS'])" \
 && if [ "$FLAVOR" = gpu ]; then python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('natten.libnatten') is None)"; fi

# ditsweep itself last: a code change rebuilds only these layers.
WORKDIR /home/ray/ditsweep
COPY pyproject.toml README.md /tmp/ditsweep-src/
COPY ditsweep /tmp/ditsweep-src/ditsweep
RUN pip install --no-deps --no-build-isolation /tmp/ditsweep-src \
 && rm -rf /tmp/ditsweep-src \
 && python /opt/ditsweep/pyproject_deps.py check /opt/ditsweep/pyproject.toml
COPY --chown=ray:ray sweeps ./sweeps
RUN chown ray:ray /home/ray/ditsweep

USER ray
ENV HOME=/home/ray
# On a laptop: docker run --rm --shm-size=2g IMAGE  runs the embedded default sweep. KubeRay
# replaces the command with its own `ray start`.
CMD ["python", "-m", "ditsweep.run", "sweeps/smoke.yaml"]
