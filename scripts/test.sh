#!/usr/bin/env bash
# The test suite on a fresh machine: install (once), lint, then pytest. The fixtures start real local
# servers (moto's S3 server, MLflow with SQLite, a local Ray with 2 CPUs) and build tiny models offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check models pipelines tuning serving tests bench scripts
python -m pytest -q --durations=20 "$@"
