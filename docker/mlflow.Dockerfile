# MLflow tracking server for ditsweep's cluster (cluster/base/mlflow.yaml runs it), built from the
# repository root (or with the Ray images by docker/build.sh):
#
#   docker build -f docker/mlflow.Dockerfile -t REGISTRY/ditsweep-mlflow:3.17.2 .
#
# PostgreSQL backend store (psycopg2) and S3 artifacts (boto3, for --artifacts-destination
# s3://...). Stores, allowed hosts and S3 keys come at run time from the Deployment's
# environment, which Kubernetes fills from a Secret and a ConfigMap: nothing secret is in the
# image.

# The base: Python's image, or any Debian or Ubuntu image (a mirror's, or the one docker/build.sh
# makes with debootstrap where no registry is reachable), which gets the distribution's Python.
ARG PYTHON_VERSION=3.12
ARG BASE_IMAGE=docker.io/library/python:${PYTHON_VERSION}-slim-trixie
# A PEM bundle in the build context (docker/local/...) that pip trusts besides the base's CAs,
# for a build behind a TLS-intercepting proxy; the image does not carry it.
ARG EXTRA_CA_CERTS=

FROM ${BASE_IMAGE} AS python
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN if ! command -v python3 >/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi


FROM python AS build
ARG EXTRA_CA_CERTS
# MLFLOW_VERSION must equal pyproject.toml's mlflow pin: the clients in the Ray images and the
# server then speak the same API (tests/test_deploy.py checks it). boto3 within pyproject's range.
# [auth]: Flask-WTF, without which `mlflow server --app-name basic-auth` (cluster/base/mlflow.yaml)
# does not start.
ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_BINARY_VERSION=2.9.13
ARG BOTO3_VERSION=1.44.8
# README.md only makes the copy valid when EXTRA_CA_CERTS is empty.
COPY docker/local/README.md ${EXTRA_CA_CERTS} /tmp/build-ca/
RUN cat /etc/ssl/certs/ca-certificates.crt $(find /tmp/build-ca -type f ! -name README.md) \
      > /tmp/build-ca.pem \
 && python3 -m venv /opt/venv \
 && PIP_CERT=/tmp/build-ca.pem /opt/venv/bin/pip install "mlflow[auth]==${MLFLOW_VERSION}" \
      "psycopg2-binary==${PSYCOPG2_BINARY_VERSION}" "boto3==${BOTO3_VERSION}"


FROM python AS image
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN python -c "import mlflow, psycopg2, boto3, flask_wtf" \
 && useradd --create-home --uid 1000 --user-group mlflow
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
# cluster/base/mlflow.yaml passes the same command with its options.
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
