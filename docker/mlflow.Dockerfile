# MLflow tracking server for ditsweep's cluster (cluster/base/mlflow.yaml runs it), built from the
# repository root:
#
#   docker build -f docker/mlflow.Dockerfile -t REGISTRY/ditsweep-mlflow:3.17.2 .
#
# PostgreSQL backend store (psycopg2) and S3 artifacts (boto3, for --artifacts-destination
# s3://...). Stores, allowed hosts and S3 keys come at run time from the Deployment's
# environment, which Kubernetes fills from a Secret and a ConfigMap: nothing secret is in the
# image.

ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim-trixie

# MLFLOW_VERSION must equal pyproject.toml's mlflow pin: the clients in the Ray images and the
# server then speak the same API (tests/test_deploy.py checks it). boto3 within pyproject's range.
ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_BINARY_VERSION=2.9.13
ARG BOTO3_VERSION=1.44.8

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==${PSYCOPG2_BINARY_VERSION}" \
        "boto3==${BOTO3_VERSION}" \
 && python -c "import mlflow, psycopg2, boto3"

RUN useradd --create-home --uid 1000 --user-group mlflow
USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
# cluster/base/mlflow.yaml passes the same command with its options.
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
