#!/usr/bin/env bash
# One research round on a new model, on a GPU machine that has no network, in as many 10-minute
# device calls as it takes: the same command again continues where the last call stopped.
#
#   MODEL=qwen2.5-coder-1.5b DEADLINE_S=560 bash benchmarks/gpu_round.sh PARTS_DIR OUT
#
# (a CPU dry run of the mechanics: MODEL=smollm2-135m DEVICE=cpu DTYPE=float32 LENGTHS=1k SCAN_N=4
#  DEV_N=4 TRIALS=2 HELDOUT_N=4 BATCH=4 HELDOUT_BATCH=4 DEADLINE_S=3000 bash benchmarks/gpu_round.sh …)
#
# Stages, each skipped once done (state in $ROUND, default /tmp/round-$MODEL, which outlives a call
# while the machine stays warm; every call copies it to OUT before its deadline):
#   detect    QR heads on 16 QR probes of 3,072 tokens (registered as MODEL@1)
#   scan      vanilla on needle, kv, pathtrans at 8K, 16K, 32640 and MRCR at $MRCR_LENGTHS (default: the
#             first length; MRCR is the slowest task to decode) (24 examples, seed 1)
#   choose    the dev cell: vanilla in [0.25, 0.75] at the longest length (else the cell nearest 0.5
#             inside [0.1, 0.9]); every other cell inside [0.1, 0.9] is a transfer cell
#   calibrate a 30-trial fast study on the dev cell (48 dev examples, seed 0), registered
#   heldout   (batch 20: 50 rows of 1.5B at 16K ran out of the H200's memory in the prefill)
#             the calibrated profile (vanilla, AttnTS at its tuned T, DySCO) and the detected heads
#             with the published knobs (DySCO) on 100 new examples of the dev cell (seed 2)
#   transfer  the calibrated profile (vanilla, DySCO) on 100 new examples of each transfer cell
# A stage cut by the deadline is rerun by the next call and resumes: `dysco eval` from its
# progress file, `calibrate` from its study.
set -uo pipefail
cd "$(dirname "$0")/.."
parts="$1" out="$2"
export MODEL="${MODEL:?MODEL=catalogue name}"
ROUND="${ROUND:-/tmp/round-$MODEL}"
source benchmarks/stages.sh
mkdir -p "$ROUND" "$out"
loop=(bash benchmarks/gpu_research_loop.sh)
gpu=(--device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}")
# sizes (the defaults are the round's; a CPU dry run shrinks them)
lengths="${LENGTHS:-8k,16k,32640}" scan_n="${SCAN_N:-24}" dev_n="${DEV_N:-48}" trials="${TRIALS:-30}"
heldout_n="${HELDOUT_N:-100}" batch="${BATCH:-24}" heldout_batch="${HELDOUT_BATCH:-20}"
mrcr_lengths="${MRCR_LENGTHS:-${lengths%%,*}}"

field() { python3 -c "import json,sys; print(json.load(open('$ROUND/choice.json'))[sys.argv[1]])" "$1"; }

stages() {
  run detect "${loop[@]}" detect "$parts" "$ROUND/detect" --probes qr --n-probes 16 --context 3072 "${gpu[@]}" || return
  run scan "${loop[@]}" eval "$ROUND/scan" --profile "$MODEL@1" --tasks needle,kv,pathtrans --lengths "$lengths" \
    --n "$scan_n" --seed 1 --methods vanilla --fast --batch-size "$batch" --quiet "${gpu[@]}" || return
  run scan-mrcr "${loop[@]}" eval "$ROUND/scan-mrcr" --profile "$MODEL@1" --tasks mrcr --lengths "$mrcr_lengths" \
    --n "$scan_n" --seed 1 --methods vanilla --fast --batch-size "$batch" --quiet "${gpu[@]}" || return
  run choose python3 benchmarks/gpu_round_choose.py "$ROUND/scan/results.json" "$ROUND/scan-mrcr/results.json" \
    --out "$ROUND/choice.json" || return
  local task length
  task=$(field task) length=$(field length)
  run calibrate "${loop[@]}" calibrate "$parts" "$ROUND/cal" --profile "$MODEL@1" --dev "$task" --context "$length" \
    --examples "$dev_n" --test-examples "$scan_n" --trials "$trials" --batch-size "$batch" --fast --quiet "${gpu[@]}" || return
  local ref; ref=$(python3 -c "import json; print(json.load(open('$ROUND/cal/calibrate.json'))['profile_ref'])")
  run heldout "${loop[@]}" eval "$ROUND/heldout-calibrated" --profile "$ref" --tasks "$task" --lengths "$length" \
    --n "$heldout_n" --seed 2 --methods vanilla,attnts,dysco --fast --batch-size "$heldout_batch" --quiet "${gpu[@]}" || return
  run heldout-published "${loop[@]}" eval "$ROUND/heldout-published" --profile "$MODEL@1" --tasks "$task" \
    --lengths "$length" --n "$heldout_n" --seed 2 --methods dysco --fast --batch-size "$heldout_batch" --quiet "${gpu[@]}" || return
  local cell i=0
  for cell in $(field transfer); do
    run "transfer-$i" "${loop[@]}" eval "$ROUND/transfer-$i" --profile "$ref" --tasks "${cell%@*}" --lengths "${cell#*@}" \
      --n "$heldout_n" --seed 2 --methods vanilla,dysco --fast --batch-size "$heldout_batch" --quiet "${gpu[@]}" || return
    i=$(( i + 1 ))
  done
  echo "[round] every stage done"
}
stages
# the registry holds the profiles the stages registered; the study is in cal/
rm -rf "$ROUND/registry"; cp -r /tmp/dysco-registry "$ROUND/registry" 2>/dev/null
cp -r "$ROUND" "$out/"
