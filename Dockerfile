# kiln serving images. The serving image holds no PyTorch: packages are exported elsewhere
# (`kiln export`) and mounted at /models, or baked in with a FROM kiln-serve + COPY of your own.
#
#   docker build --target cpu -t kiln-serve:cpu .
#   docker build --target gpu -t kiln-serve:gpu .
#   docker run -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD/models:/models:ro kiln-serve:cpu
#
# Both run as an unprivileged user and listen on 0.0.0.0: HTTP 8000, gRPC 8001, metrics 8002.

ARG PYTHON_VERSION=3.12

# ---- the wheel, built once from the source tree -------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS wheel
WORKDIR /src
RUN pip install --no-cache-dir build==1.6.1
COPY pyproject.toml README.md LICENSE ./
COPY export export
COPY runtime runtime
COPY proto proto
COPY bench bench
RUN python -m build --wheel --outdir /dist

# ---- CPU: python slim + onnxruntime -------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin kiln
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir "$(ls /dist/kiln_serve-*.whl)[cpu]" && rm -rf /dist
USER 10001
WORKDIR /home/kiln
EXPOSE 8000 8001 8002
ENTRYPOINT ["kiln", "serve", "--host", "0.0.0.0"]
CMD ["--model-repository", "/models"]

# ---- GPU: CUDA 13 runtime with cuDNN + onnxruntime-gpu (TensorRT: add its libraries on top) -----
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PATH=/opt/kiln/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/kiln \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin kiln
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir "$(ls /dist/kiln_serve-*.whl)[gpu]" && rm -rf /dist
USER 10001
WORKDIR /home/kiln
EXPOSE 8000 8001 8002
ENTRYPOINT ["kiln", "serve", "--host", "0.0.0.0", "--provider", "cuda"]
CMD ["--model-repository", "/models"]
