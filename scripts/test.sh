#!/usr/bin/env bash
# The test suite on a fresh machine: install (once), lint, then pytest. The fixtures start real local
# servers (moto's S3 server, MLflow with SQLite, a local Ray with 2 CPUs) and build tiny models offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check models pipelines tuning serving tests bench scripts
# two pytest workers, one test file at a time each (module fixtures stay in one process): two files side by side
# keep both cores busy through the Ray tests' start-ups.
# Files go out in collection order (tests/conftest.py puts the longest first), not xdist's most-tests-first order,
# which sent the one-test demo file out last
# one torch thread per process: two pytest workers with a thread per core each ran the CPU tests at half speed
# (tests/test_models.py twice side by side: 100 s with PyTorch's default threads, 49 s with one)
export OMP_NUM_THREADS=1
python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=20 "$@"
