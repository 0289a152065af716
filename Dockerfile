# fer-service: the API and the shipped checkpoint, CPU-only, non-root, read-only friendly.
#
# Two images from this file (README: "Docker and scaling out"; docs/runtimes.md):
#   lean  (the default target, what compose runs): ONNX Runtime serves the fp32 and int8 files
#         beside the checkpoint; torch is not installed.
#   torch (docker build --target torch): adds torch (CPU wheels) for FER_RUNTIME=torch (bf16 on
#         AMX), and for training, evaluation and export inside the container.
#   ray   (docker build --target ray): the lean image plus Ray (with its dashboard, which KubeRay's
#         job submission and probes talk to) and pyarrow, for `fer predict --engine ray` on a
#         KubeRay cluster (deploy/kuberay/, docs/scale.md).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS source
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY models models
COPY training training
COPY app app
COPY cli cli

FROM source AS build
# pip and setuptools are not needed to serve: out of the venv once the project is in.
RUN pip install --no-cache-dir . \
    && pip uninstall --yes --quiet pip setuptools

FROM source AS build-torch
# CPU-only PyTorch wheels for real users (about 1 GB smaller than the CUDA build); overridable.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir ".[train]"

FROM source AS build-ray
RUN pip install --no-cache-dir ".[scale]" "ray[default]" \
    && pip uninstall --yes --quiet pip setuptools

FROM ${BASE_IMAGE} AS serving
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FER_HOST=0.0.0.0 \
    FER_PORT=8000 \
    FER_CHECKPOINT=/srv/fer/models/checkpoint.pth \
    MALLOC_ARENA_MAX=2 \
    ORT_DISABLE_TELEMETRY=1
RUN useradd --system --uid 10001 --home-dir /srv/fer --shell /usr/sbin/nologin fer
WORKDIR /srv/fer
# The code lives in the venv; only the model files are copied beside it: the checkpoint (its
# classes, preprocessing and stored figures, read without torch) and its two ONNX files.
COPY --chown=root:root models/checkpoint.pth models/checkpoint.onnx models/checkpoint.int8.onnx models/
USER fer
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2)"]
CMD ["python", "-m", "app"]

FROM serving AS torch
COPY --from=build-torch /opt/venv /opt/venv

FROM serving AS ray
COPY --from=build-ray /opt/venv /opt/venv
# Ray keeps its sockets, logs and spilled objects under /tmp/ray: a writable /tmp (an emptyDir on
# Kubernetes) is all it needs; the root filesystem may stay read-only.
HEALTHCHECK NONE

# The last stage is what `docker build .` makes.
FROM serving AS lean
COPY --from=build /opt/venv /opt/venv
