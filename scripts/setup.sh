#!/usr/bin/env bash
# Set up cbbt on a fresh Linux machine: a .venv with the pinned CPU stack, and Debian's
# Fashion-MNIST when we can install it. `--dev` adds the test and lint tools, and the system
# packages the tests use: PostgreSQL's server binaries (the tests start a throwaway cluster of
# their own; no system cluster is created) and iproute2/util-linux (`ip`, `unshare`: the Ray
# tests run in a loopback-only network namespace).
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

if [[ -n "$extras" ]]; then
    apt_packages=()
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || apt_packages+=(postgresql)
    command -v ip >/dev/null || apt_packages+=(iproute2)
    command -v unshare >/dev/null || apt_packages+=(util-linux)
    if ((${#apt_packages[@]})); then
        if [[ "$(id -u)" != "0" ]] || ! command -v apt-get >/dev/null; then
            echo "setup: the tests need ${apt_packages[*]}: install them (as root), then rerun" >&2
            exit 1
        fi
        mkdir -p /etc/postgresql-common
        grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf \
            || echo "create_main_cluster = false" >>/etc/postgresql-common/createcluster.conf
        echo "setup: installing ${apt_packages[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${apt_packages[@]}" >/dev/null
    fi
    # benchmarks/make_image_sets.py's emoji set: optional (its drawing test skips without them),
    # so a best-effort install where we are root anyway
    optional_packages=()
    [[ -f /usr/share/unicode/emoji/emoji-test.txt ]] || optional_packages+=(unicode-data)
    [[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]] || optional_packages+=(fonts-noto-color-emoji)
    if ((${#optional_packages[@]})) && [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null; then
        echo "setup: installing ${optional_packages[*]} (optional: the emoji benchmark set)" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${optional_packages[@]}") >/dev/null 2>&1 \
            || echo "setup: could not install ${optional_packages[*]}; the emoji set's test will skip" >&2
    fi
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
# torch==2.13.0 is the CPU build (pinned in pyproject.toml): no CUDA packages are pulled in.
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
echo "setup: ready (.venv)" >&2
