#!/usr/bin/env bash
# Make .venv (if missing) and install the project with its test tools. Idempotent: a second run with the
# same pyproject.toml does nothing. torch 2.14.1 + torchvision 0.29.1 come first (pip takes them from the
# machine's wheel cache where there is one; torch-fidelity imports torchvision); DeepSpeed builds its
# wheel against that torch, so it installs without build isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
# headless Chromium for the web-page test (Debian packages); needs root, skipped otherwise
if ! command -v chromedriver >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install -q --no-build-isolation deepspeed==0.19.8
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
