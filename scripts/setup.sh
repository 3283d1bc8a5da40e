#!/usr/bin/env bash
# Set up cbbt on a fresh Linux machine: a .venv with the pinned CPU stack, and Debian's
# Fashion-MNIST when we can install it. `--dev` adds the test and lint tools.
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [[ "${1:-}" == "--dev" ]]; then extras="[dev]"; fi

if [[ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]]; then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian's dataset-fashion-mnist" >&2
        (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
            || echo "setup: could not install dataset-fashion-mnist; the demo will use digits" >&2
    else
        echo "setup: Debian's dataset-fashion-mnist is absent (needs root); the demo will use digits" >&2
    fi
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
# torch==2.13.0 is the CPU build (pinned in pyproject.toml): no CUDA packages are pulled in.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
echo "setup: ready (.venv)" >&2
