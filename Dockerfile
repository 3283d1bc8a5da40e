# cbbt model server (and client). Build arguments:
#   TORCH_INDEX_URL  where torch/torchvision come from: the CPU wheels (default) or a CUDA index,
#                    e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
#   EXTRAS           optional extras: postgres (shared store), ray (replicas on Ray Serve)
# The base image is pinned to an exact release; bump it deliberately.
FROM python:3.11.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=postgres,ray

RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

# A non-root user with a writable home and cache (torch, Hugging Face, matplotlib write there),
# and the volumes' mount points owned by it: a named volume starts as a copy of these folders.
RUN useradd --create-home --home-dir /home/cbbt --uid 10001 --user-group cbbt \
    && mkdir -p /data /runs /home/cbbt/.cache \
    && chown -R cbbt:cbbt /data /runs /home/cbbt

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY server ./server
COPY client ./client
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" "torch==2.13.0" "torchvision==0.28.0" \
    && pip install --no-cache-dir ".[${EXTRAS}]"

ENV HOME=/home/cbbt \
    XDG_CACHE_HOME=/home/cbbt/.cache \
    HF_HOME=/home/cbbt/.cache/huggingface \
    MPLCONFIGDIR=/home/cbbt/.cache/matplotlib \
    HF_HUB_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    CBBT_HOST=0.0.0.0 \
    CBBT_PORT=8000 \
    CBBT_DB=/data/cbbt.db
VOLUME ["/data", "/runs"]
EXPOSE 8000
# No HEALTHCHECK here: one-shot containers (keys, tune) run this image too. docker-compose.yml
# declares the serving services' checks (GET /ready).
USER cbbt
CMD ["cbbt-server", "serve"]
