# syntax=docker/dockerfile:1
# The cnn3d project image: cnn3d-train, cnn3d-tune, mlflow server and optuna-dashboard, CPU torch by default.
#
#   docker build -t cnn3d:cpu .
#   docker build -t cnn3d:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# The CUDA wheels bring their own CUDA runtime; the host needs an NVIDIA driver and the NVIDIA
# Container Toolkit (run with --gpus all, or the compose override in docs/distributed.md).

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# torch is pinned and installed first, from the CPU index unless told otherwise: a bare
# `pip install torch` would pull a multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

# A C compiler and glibc's headers: the lattice step's CPU kernels (cnn3d/native.c) are built on
# first use for the host's CPU, into ~/.cache/cnn3d/kernels; without them the step runs in slower
# torch ops (README, "Speed on CPU").
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 cnn3d \
 && mkdir -p /app /cache /mlartifacts \
 && chown cnn3d:cnn3d /app /cache /mlartifacts
WORKDIR /app

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project, its dependencies held to the tested versions (constraints.txt, minus torch,
# which is already installed from the index above and satisfies the project's range).
COPY constraints.txt pyproject.toml README.md ./
COPY cnn3d ./cnn3d
COPY tuner ./tuner
COPY --chown=cnn3d:cnn3d studies ./studies
RUN grep -viE '^(torch|nvidia-|triton)[=-]' constraints.txt > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt ".[dashboard]" \
 && rm /tmp/constraints.txt \
 && python -c "import torch, mlflow, optuna, optuna_dashboard, psycopg; print('torch', torch.__version__)"

USER cnn3d
# without --storage/--tracking-uri: the embedded stores under /app (studies/cnn3d.db, mlruns/)
CMD ["cnn3d-tune", "--help"]
