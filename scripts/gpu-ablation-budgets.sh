#!/usr/bin/env bash
# Orchestrates `distillery run configs/shapes-ablation.yaml` at several step budgets on one GPU (issue 22), one
# run per budget in one work dir (the prepare stage runs once; each budget is its own search), archiving each
# run's tune/results as OUT/steps-N.tgz. No training loop of its own. Usage (in a checkout, with the run bundle):
#   ARMS='[{name: out-kd, loss: {task: 1.0, out: 1.0, feat: 0.0}}]' bash scripts/gpu-ablation-budgets.sh OUT 450 650
# ARMS (a YAML list for tune.arms) is optional: the config's arms by default. EXTRA: more --set arguments.
set -euo pipefail
out="$1"; shift
W=${WORK:-/tmp/ablation}
C=(configs/shapes-ablation.yaml --set "work_dir=$W" --set "mlflow.tracking_uri=${TRACKING:-file://$W/mlruns}"
   --set ray.include_dashboard=false)
[[ -n "${ARMS:-}" ]] && C+=(--set "tune.arms=$ARMS")
read -ra extra <<< "${EXTRA:-}"
for steps in "$@"; do
  t=$(date +%s); rm -rf "$W/tune/results"
  python3 -m pipelines run "${C[@]}" --set "tune.steps_per_trial=$steps" --set "tune.val_every=$(( steps / 2 ))" \
    "${extra[@]}" > "$out/steps-$steps.log" 2>&1 || echo "steps $steps FAILED"
  echo "steps $steps: $(( $(date +%s) - t )) s"
  # one archive per budget: a device call returns only a few files
  tar -czf "$out/steps-$steps.tgz" -C "$W/tune" results 2>/dev/null || true
  cat "$W/tune/results/arms.md" 2>/dev/null || tail -20 "$out/steps-$steps.log"
done
