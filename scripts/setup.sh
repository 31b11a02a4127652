#!/usr/bin/env bash
# Install the project and its test tools into the active Python environment (a venv).
# torch 2.14.1 + torchvision 0.29.1 first: pip takes them from the machine's wheel cache where there is
# one; DeepSpeed builds its wheel against that torch, so it installs without build isolation.
set -euo pipefail
pip install -q --upgrade pip
pip install -q torch==2.14.1 torchvision==0.29.1
pip install -q --no-build-isolation deepspeed==0.19.8
pip install -q -e '.[dev]'
