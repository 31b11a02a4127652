#!/usr/bin/env bash
# The main job on the embedded default, on a fresh machine: install (once), then `distillery demo`
# (local Ray, local S3-compatible server, local MLflow; the built-in shapes dataset and tiny teacher).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pipelines demo "$@"
