#!/usr/bin/env bash
# Orchestrates the product's stages for issue 26's table on one GPU (no training loop of its own): prepare
# 10,000 shapes images once, then for each objective `distillery run` with stages [steps, evaluate] on the
# shipped teacher, the evaluate stage sweeping the student at 1, 2, 4 and 8 steps. Usage (in a checkout):
#   bash scripts/gpu-steps-objectives.sh OUT_DIR STEPS_PER_ROUND NUM_PROMPTS OBJECTIVE[:KEY=VALUE,...] ...
# e.g. bash scripts/gpu-steps-objectives.sh /tmp/out 300 1000 dmd adversarial consistency:steps.lcm_skip=20
# The source of the few-step students is the shipped teacher's own weights, or with STUDENT=distill the bk-small
# that `distillery run configs/shapes-h200.yaml` (stages prepare and distill, DISTILL_STEPS of them, default the
# config's; DISTILL_EVAL=1 adds evaluate) distills from it first (a rerun finds the finished stages and skips
# them), or with STUDENT=FOLDER an existing student.
set -euo pipefail
out="$1"; per="$2"; prompts="$3"; shift 3
W=${WORK:-/tmp/s26}
TRACKING=${TRACKING:-file:///tmp/mlruns}
C=(configs/shapes-teacher.yaml --set "work_dir=$W" --set "data.source=builtin:shapes?n=10000&seed=0"
   --set "mlflow.tracking_uri=$TRACKING" --set ray.include_dashboard=false)
# a rerun (on a warm machine, after a call's limit cut one) keeps each earlier log beside the new one
fresh_log() { [[ -e "$out/$1.log" ]] && mv "$out/$1.log" "$out/$1.log.$(date +%s)"; echo "$out/$1.log"; }
t0=$(date +%s)
python3 -m pipelines run "${C[@]}" --set 'stages=[prepare]' > "$(fresh_log prepare)" 2>&1
echo "prepare $(( $(date +%s) - t0 )) s"
student=${STUDENT:-builtin:shapes-sd1}
if [[ "$student" == distill ]]; then
  t=$(date +%s)
  python3 -m pipelines run configs/shapes-h200.yaml --set "work_dir=$W/distill" --set "stages=[prepare,distill${DISTILL_EVAL:+,evaluate}]" \
    --set "mlflow.tracking_uri=$TRACKING" --set ray.include_dashboard=false \
    ${DISTILL_STEPS:+--set "distill.max_steps=$DISTILL_STEPS"} > "$(fresh_log distill)" 2>&1
  student="$W/distill/student"
  cp "$W/distill/eval/metrics.json" "$out/distill-metrics.json" 2>/dev/null || true
  echo "distill + evaluate (bk-small) $(( $(date +%s) - t )) s"
fi
for spec in "$@"; do
  obj="${spec%%:*}"; name="${obj}"; extra=()
  if [[ "$spec" == *:* ]]; then
    IFS=',' read -ra kv <<< "${spec#*:}"
    for x in "${kv[@]}"; do extra+=(--set "$x"); done
    name="${obj}-$(echo "${spec#*:}" | tr -c 'a-zA-Z0-9\n' '_')"
  fi
  t=$(date +%s)
  python3 -m pipelines run "${C[@]}" --set 'stages=[steps,evaluate]' --set "steps.student=$student" \
    --set "steps.objective=$obj" --set steps.batch_size=64 --set "steps.steps_per_round=$per" \
    --set steps.guidance_scale=5.0 --set distill.log_every=25 --set "steps.run_name=$name" \
    --set "steps.output=$W/$name" --set "evaluate.student=$W/$name" --set "evaluate.output=$W/eval-$name" \
    --set 'evaluate.steps_sweep=[1,2,4,8]' --set "evaluate.num_prompts=$prompts" "${extra[@]}" \
    > "$(fresh_log "$name")" 2>&1 || echo "$name FAILED"
  echo "$name $(( $(date +%s) - t )) s"
  grep -E "\[steps\] step" "$out/$name.log" | tail -3 || true
  cp "$W/eval-$name/metrics.json" "$out/$name-metrics.json" 2>/dev/null || ls "$W/eval-$name" || true
done
