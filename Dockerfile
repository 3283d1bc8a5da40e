# cbbt model server (and client) on the pinned CPU stack.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY server ./server
COPY client ./client
RUN pip install --no-cache-dir . && mkdir -p /data && chown nobody /data

ENV HF_HUB_OFFLINE=1 \
    CBBT_HOST=0.0.0.0 \
    CBBT_PORT=8000 \
    CBBT_DB=/data/cbbt.db
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD \
    python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/ready').status != 200)"
USER nobody
CMD ["cbbt-server", "serve"]
