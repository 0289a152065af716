# fer-service: the API and the shipped checkpoint, CPU-only, non-root, read-only friendly.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# CPU-only PyTorch wheels for real users (about 1 GB smaller than the CUDA build); overridable.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY models models
COPY training training
COPY app app
COPY cli cli
RUN pip install --no-cache-dir .

FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FER_HOST=0.0.0.0 \
    FER_PORT=8000 \
    FER_CHECKPOINT=/srv/fer/models/checkpoint.pth \
    MALLOC_ARENA_MAX=2
RUN useradd --system --uid 10001 --home-dir /srv/fer --shell /usr/sbin/nologin fer
COPY --from=build /opt/venv /opt/venv
WORKDIR /srv/fer
# The code lives in the venv; only the weights are copied beside it.
COPY --chown=root:root models/checkpoint.pth models/checkpoint.int8.onnx models/
USER fer
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2)"]
CMD ["python", "-m", "app"]
