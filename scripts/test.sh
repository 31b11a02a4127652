#!/usr/bin/env bash
# The test suite: lint, then pytest (real local S3, MLflow and Ray started by the fixtures).
set -euo pipefail
ruff check models pipelines tuning serving tests bench
python -m pytest -q -x --durations=15 "$@"
