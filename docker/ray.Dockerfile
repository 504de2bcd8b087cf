# The Ray images of ditsweep, built from the repository root. docker/build.sh builds all three
# images with Docker or Podman (and makes a Debian base where no registry is reachable); by hand:
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
# level) differs from the head's, so the head and the workers must get the same distribution's
# Python and the same wheels.
#
# Everything the build fetches from outside PyPI and the distribution's archive is a build
# argument, so that a build behind a mirror or a TLS-intercepting proxy can be pointed elsewhere:
# the base images, the torch index, NATTEN's wheel index, the Inception weights (a URL, or a
# file in the build context) and an extra CA bundle. Files from the builder's machine go in
# docker/local/ (the one directory of docker/ the build context takes besides the scripts).
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
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG NATTEN_VERSION=0.21.7
# Base images. A mirror's copies, or a base made on the build machine (docker/build.sh makes a
# Debian one with debootstrap), replace them; the cpu and gpu bases must be one distribution
# release, for the same Python on the head and the workers.
ARG CPU_BASE_IMAGE=docker.io/library/ubuntu:${UBUNTU_VERSION}
ARG GPU_BUILD_IMAGE=docker.io/nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION}
ARG GPU_RUNTIME_IMAGE=docker.io/nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}
# torch-fidelity's Inception weights: the URL torch-fidelity 0.4.0 itself downloads from, or,
# when INCEPTION_FILE names a file in the build context (docker/local/...), that file instead.
ARG INCEPTION_URL=https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
ARG INCEPTION_FILE=
# A PEM bundle in the build context (docker/local/...) that pip and the weights' download trust
# besides the distribution's CAs, for a build behind a TLS-intercepting proxy. Used by the
# build stages only: the image does not carry it.
ARG EXTRA_CA_CERTS=
ARG USER_UID=1000

# Base images per flavour. "build" compiles (CUDA toolkit with nvcc for libnatten); "runtime"
# only runs. torch's wheels bring their own CUDA libraries, the runtime image adds the CUDA
# runtime a source-built libnatten links against. Flavour-specific settings are set here, as
# environment of the build stage only, so that the other flavour never sees them.
FROM ${CPU_BASE_IMAGE} AS cpu-build
# torch's CPU wheels (PyPI's torch for Linux is the CUDA build, 3 GB of CUDA libraries more).
# Empty: the default index (PyPI, or pip's configured mirror).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL}

FROM ${CPU_BASE_IMAGE} AS cpu-runtime

FROM ${GPU_BUILD_IMAGE} AS gpu-build
ARG TORCH_CUDA=cu130
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}
# NATTEN publishes wheels per torch minor and CUDA pair (natten==V+torch2130cu130 for torch 2.13
# and CUDA 13.0) at this index. When it has none for the installed torch, libnatten is compiled
# from the source distribution for these GPU architectures (compute capabilities; add 10.0 for
# B200, 12.0 for RTX 50xx): each one adds build time, so list only the cluster's GPUs.
# NATTEN's setup.py compiles libnatten whenever NATTEN_CUDA_ARCH is set, which is why only this
# stage has it: the cpu flavour has no nvcc.
ARG NATTEN_WHEEL_INDEX=https://whl.natten.org
ARG NATTEN_CUDA_ARCH="8.0;8.6;8.9;9.0"
# Parallel compile jobs for that fallback (empty: half the build machine's cores). NATTEN's
# kernels need a few GB of memory per job.
ARG NATTEN_N_WORKERS=
ENV TORCH_INDEX_URL=${TORCH_INDEX_URL} \
    NATTEN_WHEEL_INDEX=${NATTEN_WHEEL_INDEX} \
    NATTEN_CUDA_ARCH=${NATTEN_CUDA_ARCH} \
    NATTEN_N_WORKERS=${NATTEN_N_WORKERS}

FROM ${GPU_RUNTIME_IMAGE} AS gpu-runtime


# ---- python: the distribution's Python in a virtualenv, and the build's CA bundle ------------
FROM ${FLAVOR}-build AS python
ARG EXTRA_CA_CERTS
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev build-essential cmake ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# The build's trust: the distribution's CAs plus EXTRA_CA_CERTS (README.md only makes the copy
# valid when that is empty).
COPY docker/local/README.md ${EXTRA_CA_CERTS} /tmp/build-ca/
RUN cat /etc/ssl/certs/ca-certificates.crt $(find /tmp/build-ca -type f ! -name README.md) \
      > /etc/ssl/build-ca.pem \
 && rm -rf /tmp/build-ca
ENV PIP_CERT=/etc/ssl/build-ca.pem \
    SSL_CERT_FILE=/etc/ssl/build-ca.pem
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# setuptools, wheel and build: NATTEN and ditsweep are built without build isolation below.
RUN pip install --upgrade pip setuptools wheel build


# ---- requirements: pyproject.toml's [project].dependencies, one a line ------------------------
# Read from the file itself so the image cannot drift from it, in a stage of its own so that an
# edit elsewhere in pyproject.toml leaves the installed dependencies' layers cached.
FROM python AS requirements
COPY docker/pyproject_deps.py pyproject.toml /tmp/deps/
RUN python /tmp/deps/pyproject_deps.py requirements /tmp/deps/pyproject.toml > /tmp/requirements.txt


# ---- deps: a virtualenv with every dependency of ditsweep, ditsweep itself excluded ----------
FROM python AS deps
ARG FLAVOR
ARG TORCH_VERSION
ARG TORCHVISION_VERSION
ARG NATTEN_VERSION

# torch first, from the flavour's index (cu130 or cpu; empty: the default index), so that
# nothing later pulls another build of it.
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
      ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# NATTEN next, against that torch (its source build imports torch, hence no build isolation).
COPY docker/install-natten.sh /tmp/install-natten.sh
RUN bash /tmp/install-natten.sh /tmp/natten \
 && pip install --no-deps /tmp/natten/natten-*.whl \
 && rm -rf /tmp/natten

# Then the rest (ray[default,tune]: "default" brings the dashboard and job server that
# KubeRay's head, job submitter and autoscaler use).
COPY --from=requirements /tmp/requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt


# ---- weights: the FID feature extractor's weights, downloaded or taken from the context -------
FROM python AS weights
ARG INCEPTION_URL
ARG INCEPTION_FILE
COPY docker/local/README.md ${INCEPTION_FILE} /tmp/inception/
RUN mkdir -p /opt/ditsweep/weights \
 && dest=/opt/ditsweep/weights/weights-inception-2015-12-05-6726825d.pth \
 && if [ -n "$INCEPTION_FILE" ]; then cp "/tmp/inception/$(basename "$INCEPTION_FILE")" "$dest"; \
    else python -c "import sys, urllib.request; urllib.request.urlretrieve(*sys.argv[1:])" \
      "$INCEPTION_URL" "$dest"; fi \
 && rm -rf /tmp/inception


# ---- the image --------------------------------------------------------------------------------
FROM ${FLAVOR}-runtime AS image
ARG FLAVOR
ARG USER_UID
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# python3: the same distribution Python the venv was made with. g++ and python3-dev:
# torch.compile (Inductor, Triton) compiles C at run time. wget: KubeRay's health probes and job
# submitter call it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev g++ wget ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# A non-root user with the uid Ray's own images use (Ubuntu's default "ubuntu" user has it).
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid "${USER_UID}" --user-group --shell /bin/bash ray

COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv
# The FID feature extractor's weights, never fetched at run time (clusters and CI machines may
# have no route to GitHub). ditsweep reads the path from this variable.
ENV DITSWEEP_INCEPTION_WEIGHTS=/opt/ditsweep/weights/weights-inception-2015-12-05-6726825d.pth
COPY --from=weights /opt/ditsweep/weights /opt/ditsweep/weights
# The weights load into torch-fidelity's extractor (a truncated or wrong file fails the build),
# and on GPU the NATTEN wheel carries libnatten (checked by file: loading it needs a driver).
RUN python -c "import os; from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as F; F('inception-v3-compat', ['2048'], feature_extractor_weights_path=os.environ['DITSWEEP_INCEPTION_WEIGHTS'])" \
 && if [ "$FLAVOR" = gpu ]; then python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('natten.libnatten') is None)"; fi

# ditsweep itself last: a code change rebuilds only these layers. The build ends by checking
# every installed version against pyproject.toml.
WORKDIR /home/ray/ditsweep
COPY docker/pyproject_deps.py /opt/ditsweep/pyproject_deps.py
COPY pyproject.toml README.md /tmp/ditsweep-src/
COPY ditsweep /tmp/ditsweep-src/ditsweep
RUN pip install --no-deps --no-build-isolation /tmp/ditsweep-src \
 && python /opt/ditsweep/pyproject_deps.py check /tmp/ditsweep-src/pyproject.toml \
 && rm -rf /tmp/ditsweep-src
# The repository's sweeps/, in /opt (a results volume mounted on the working directory does not
# hide them) and linked into the working directory, where the manifests' `sweeps/...` resolves.
COPY sweeps /opt/ditsweep/sweeps
RUN ln -s /opt/ditsweep/sweeps sweeps \
 && chown -h ray:ray /home/ray/ditsweep sweeps

USER ray
ENV HOME=/home/ray
# On a laptop: the smoke sweep, its results (./mlflow.db and ./mlruns, Tune's checkpoints in
# ./ray_results, the report in ./reports) in the working directory, kept on the host by a volume
# there (README.md, "Docker"):
#   docker run --rm --shm-size=2g -v "$PWD/results:/home/ray/ditsweep" IMAGE
# KubeRay replaces the command with its own `ray start`.
CMD ["python", "-m", "ditsweep.run", "/opt/ditsweep/sweeps/smoke.yaml"]
