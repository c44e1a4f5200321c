#!/usr/bin/env bash
# Do QR heads found on key-value probes see the asked pair where the heads found on prose miss it,
# and does DySCO then help kv? (docs/results.md round 2: on Qwen2.5-Coder-0.5B at 8K the prose-probe
# heads put < 30% of their importance on the asked pair in 106 of the 119 examples vanilla fails.)
#
#   MODEL=qwen2.5-coder-0.5b DEADLINE_S=560 bash benchmarks/kv_heads.sh PARTS_DIR OUT
#
# Stages (resumable like benchmarks/gpu_round.sh; state in $ROUND, default /tmp/kvheads-$MODEL; a
# registry of its own, so the round's profile numbers do not move):
#   detect-kv  QR heads on 16 kv probes of 3,072 tokens (`headfinder detect --probes kv`) -> MODEL@1
#   detect-qr  QR heads on 16 prose QR probes of 3,072 tokens, the round's detection       -> MODEL@2
#   eval-kv    vanilla and DySCO with the kv-probe heads (published knobs) on $N kv examples at $LENGTH
#   eval-qr    DySCO with the prose heads on the same examples (seed 2)
#   calibrate  (STUDY=1, the default) a 30-trial fast study from the kv-probe heads on 48 kv dev
#              examples at $LENGTH (seed 0), registered
#   eval-cal   DySCO with the calibrated profile on the same held-out examples
# The evals report selection recall; benchmarks/pair_runs.py pairs the runs afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
parts="$1" out="$2"
export MODEL="${MODEL:?MODEL=catalogue name}"
ROUND="${ROUND:-/tmp/kvheads-$MODEL}"
export DYSCO_REGISTRY="${KV_REGISTRY:-/tmp/dysco-registry-kvheads}"
source benchmarks/stages.sh
mkdir -p "$ROUND" "$out"
loop=(bash benchmarks/gpu_research_loop.sh)
gpu=(--device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}")
length="${LENGTH:-8192}" n="${N:-200}" batch="${BATCH:-50}" probe_length="${PROBE_LENGTH:-3072}"
eval_args=(--tasks kv --lengths "$length" --n "$n" --seed 2 --fast --batch-size "$batch" --quiet "${gpu[@]}")

stages() {
  run detect-kv "${loop[@]}" detect "$parts" "$ROUND/detect-kv" --probes kv --n-probes 16 --context "$probe_length" \
    "${gpu[@]}" || return
  run detect-qr "${loop[@]}" detect "$parts" "$ROUND/detect-qr" --probes qr --n-probes 16 --context "$probe_length" \
    "${gpu[@]}" || return
  run eval-kv "${loop[@]}" eval "$ROUND/eval-kv" --profile "$MODEL@1" --methods vanilla,dysco "${eval_args[@]}" || return
  run eval-qr "${loop[@]}" eval "$ROUND/eval-qr" --profile "$MODEL@2" --methods dysco "${eval_args[@]}" || return
  if [ "${STUDY:-1}" = 1 ]; then
    run calibrate "${loop[@]}" calibrate "$parts" "$ROUND/cal" --profile "$MODEL@1" --dev kv --context "$length" \
      --examples "${DEV_N:-48}" --test-examples 24 --trials "${TRIALS:-30}" --batch-size 24 --fast --quiet "${gpu[@]}" \
      || return
    local ref; ref=$(python3 -c "import json; print(json.load(open('$ROUND/cal/calibrate.json'))['profile_ref'])")
    run eval-cal "${loop[@]}" eval "$ROUND/eval-cal" --profile "$ref" --methods dysco "${eval_args[@]}" || return
  fi
  echo "[kv-heads] every stage done"
}
stages
rm -rf "$ROUND/registry"; cp -r "$DYSCO_REGISTRY" "$ROUND/registry" 2>/dev/null
cp -r "$ROUND" "$out/"
