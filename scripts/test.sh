#!/usr/bin/env bash
# The test suite on a fresh machine: install (once), lint, then pytest. The fixtures start real local
# servers (moto's S3 server, MLflow with SQLite, a local Ray with 2 CPUs) and build tiny models offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check models pipelines tuning serving tests bench scripts
# two pytest workers, one test file at a time each (module fixtures stay in one process): the Ray tests spend
# most of their time waiting (start-up, polling), so two files side by side cut the wall time by about a quarter.
# Files go out in collection order (tests/conftest.py puts the longest first), not xdist's most-tests-first order,
# which sent the one-test demo file out last
python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20 "$@"
