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
# pip and setuptools are not needed to serve: out of the venv once the project is in, with the
# packages' own test suites (numpy's alone are 17 MB) and ONNX Runtime's offline model tools
# (transformer optimisers, quantisation: training.quantize runs them where torch is), which
# serving never imports.
RUN pip install --no-cache-dir . \
    && pip uninstall --yes --quiet pip setuptools \
    && find /opt/venv/lib -depth -type d -name tests -path "*/site-packages/*" -exec rm -rf {} + \
    && rm -rf /opt/venv/lib/python3*/site-packages/onnxruntime/transformers \
        /opt/venv/lib/python3*/site-packages/onnxruntime/quantization \
        /opt/venv/lib/python3*/site-packages/onnxruntime/tools

FROM source AS build-torch
# CPU-only PyTorch wheels for real users (about 1 GB smaller than the CUDA build); overridable.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir ".[train]"

FROM source AS build-ray
# The Ray of deploy/kuberay/rayjob.yaml's rayVersion: a cluster's nodes and driver must agree.
ARG RAY_VERSION=2.60.0
RUN pip install --no-cache-dir ".[scale]" "ray[default]==${RAY_VERSION}" \
    && pip uninstall --yes --quiet pip setuptools

FROM ${BASE_IMAGE} AS runtime
# The Python runtime alone, as distroless images are: the base image less what only installing
# needs (pip, setuptools, apt and dpkg with their lists and caches, perl, which only they run)
# and what nothing here reads (manuals, translations, glibc's iconv modules), squashed into one
# layer by the stage below, so that what is deleted here is not carried underneath. dpkg's
# status file stays: image scanners read the installed packages from it.
RUN useradd --system --uid 10001 --home-dir /srv/fer --shell /usr/sbin/nologin fer \
    && rm -rf /usr/share/doc /usr/share/man /usr/share/info /usr/share/locale /usr/share/lintian \
        /usr/share/python-wheels /var/lib/apt /var/cache/apt /var/cache/debconf /var/log/* \
        /usr/lib/python3/dist-packages/pip* /usr/lib/python3/dist-packages/setuptools* \
        /usr/lib/python3/dist-packages/wheel* /usr/lib/python3/dist-packages/pkg_resources \
        /usr/local/lib/python3*/site-packages/pip* /usr/local/lib/python3*/site-packages/setuptools* \
        /usr/local/lib/python3*/site-packages/wheel* /usr/local/lib/python3*/ensurepip \
        /usr/bin/apt* /usr/lib/apt /usr/lib/*-linux-gnu/libapt-* /etc/apt /usr/bin/dpkg* /var/lib/dpkg/info \
        /usr/bin/perl* /usr/lib/*-linux-gnu/perl* /usr/share/perl* /usr/lib/*-linux-gnu/gconv

FROM scratch AS serving
COPY --from=runtime / /
# The base image's environment does not pass through `FROM scratch`: PATH and the locale again.
ENV LANG=C.UTF-8 \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FER_HOST=0.0.0.0 \
    FER_PORT=8000 \
    FER_CHECKPOINT=/srv/fer/models/checkpoint.pth \
    MALLOC_ARENA_MAX=2 \
    ORT_DISABLE_TELEMETRY=1
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
# The image's user owns no home: Ray keeps its token and state under HOME, here the writable /tmp.
ENV HOME=/tmp
# Ray keeps its sockets, logs and spilled objects under /tmp/ray: a writable /tmp (an emptyDir on
# Kubernetes) is all it needs; the root filesystem may stay read-only.
HEALTHCHECK NONE

# The last stage is what `docker build .` makes.
FROM serving AS lean
COPY --from=build /opt/venv /opt/venv
