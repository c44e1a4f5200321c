#!/usr/bin/env bash
# Issue 16's open two-GPU checks in one device call (nvidia-h200-x2), from a checkout that is not
# pip-installed (python3 from the repository root, PYTHONPATH set to it; no optuna, mlflow or
# platformdirs needed, so no wheel travels):
#
#   bash benchmarks/two_gpu_checks.sh OUT          # on two GPUs
#   CPU=1 bash benchmarks/two_gpu_checks.sh OUT    # the CPU dry run: tiny tp_speed, eval on cpu,cpu
#
# Steps, each run even when an earlier one failed, each under `timeout` so that the summary is
# always printed (the device call's limit is 10 minutes):
#   pytest-gpu   python3 -m pytest -q -m gpu tests/decoder/test_tensor_parallel.py (TP over NCCL, exact
#                and fast path, eager and with CUDA graphs, and a device_map over the two GPUs,
#                against one GPU; float32, tiny models)
#   (the two eval checks, quick, run before the float32 benchmark, the long one)
#   tp-float32   benchmarks/tp_speed.py --dtype float32 at 32K and 64K ($TP_CONTEXTS), 12 tokens: single, tp,
#                device_map; tokens, first differing step, single's top-2 margin there, max |logit diff|
#   eval-exact   benchmarks/eval_devices_check.py: `dysco eval --devices 0,1` against `--device cuda:0`
#                on the same examples (tiny llama with its tokenizer), PASS when every example's
#                responses and scores, the cells and the paired tests are equal
#   eval-fast    the same with --fast (CUDA graphs and Triton kernels on a worker whose GPU is cuda:1)
#   tp-bfloat16  tp_speed.py in bf16 at 32K again (the same checkpoint), now with the agreement
#                columns; only when at least 150 s are left
#
# Estimate on two H200s (from the bf16 run of 2026-11-30: 124 s for the 16 GB checkpoint write,
# three loads and 12 decodes): pytest-gpu ~100 s (torchrun, NCCL, Triton compiles), tp-float32
# ~200 s (checkpoint write ~60 s, three float32 loads, 12 decodes; memory: 30.5 GiB of float32
# weights, DySCO at 64K ~110 GiB on one GPU by the bf16 run's growth per token, under the H200's
# 140), eval-exact ~40 s, eval-fast ~60 s (Triton compiles), tp-bfloat16 ~100 s: about 8 minutes in
# all. Steps share a 560 s deadline; tp-bfloat16, the last, is the one dropped when time is short.
#
# OUT receives at most 7 files (the device tool returns 8): summary.txt, pytest-gpu.log,
# tp_speed-float32.md, tp_speed-bfloat16.md, eval-devices.txt, work.tar.gz (every log, JSON and
# report of the work folder, without checkpoints). The work folder is $WORK (default
# /tmp/two_gpu_checks; it holds the 16 GB checkpoint, reused by a second call on a warm machine).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bash benchmarks/two_gpu_checks.sh OUT}"
WORK="${WORK:-${TMPDIR:-/tmp}/two_gpu_checks}"
DEADLINE="${DEADLINE:-560}"
mkdir -p "$OUT" "$WORK"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DYSCO_CACHE="$WORK/cache" DYSCO_REGISTRY="$WORK/registry"
T0=$SECONDS

if [ -n "${CPU:-}" ]; then
  TP=(--tiny --hooks --contexts 64,128 --steps 6 --checkpoint "$WORK/ckpt-tiny")
  TP_BF16=(--tiny --hooks --contexts 64 --steps 6 --checkpoint "$WORK/ckpt-tiny")
  EVAL=(--one cpu --devices cpu,cpu)
  MACHINE="CPU dry run ($(hostname))"
else
  TP=(--contexts "${TP_CONTEXTS:-32768,65536}" --steps 12 --checkpoint "$WORK/ckpt")
  TP_BF16=(--contexts 32768 --steps 12 --checkpoint "$WORK/ckpt")
  EVAL=(--one cuda:0 --devices 0,1)
  MACHINE="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | paste -sd ';' -)"
fi

SOFTWARE="python3 $(python3 -c 'import platform, torch, transformers; print(platform.python_version(), "torch",
  torch.__version__, "transformers", transformers.__version__, "cuda devices", torch.cuda.device_count())' 2>&1 | tail -1)"
SUMMARY=()
summary() {  # the summary so far, into OUT/summary.txt (a call cut short keeps it)
  {
    echo "two_gpu_checks — $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - T0)) s, $MACHINE"
    echo "$SOFTWARE"
    printf '%s\n' "${SUMMARY[@]}"
    for dtype in float32 bfloat16; do
      md="$WORK/tp-$dtype/tp_speed.md"
      [ -f "$md" ] && { echo; echo "tp_speed $dtype:"; sed -n '/^| placement/,$p' "$md"; }
    done
  } > "$OUT/summary.txt"
}

# step NAME CAP COMMAND...: run under min(CAP, time left before the deadline), log to WORK/NAME.log.
step() {
  local name=$1 cap=$2; shift 2
  local left=$((DEADLINE - (SECONDS - T0))) start=$SECONDS rc
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 20 ]; then
    SUMMARY+=("$(printf '%-12s skipped: %d s left before the %d s deadline' "$name" "$left" "$DEADLINE")")
    summary; return
  fi
  echo "== $name (limit ${limit}s, at $((SECONDS - T0))s)"
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  local note
  case $rc in
    0) note="ok" ;;
    124|137) note="TIMED OUT after ${limit}s" ;;
    *) note="FAILED (exit $rc)" ;;
  esac
  case $name in
    pytest-gpu)  # a skipped GPU test (fewer than two GPUs seen) is not a pass
      note="$note: $(grep -E '(passed|failed|skipped|error)' "$WORK/$name.log" | tail -1)"
      grep -qE '[0-9]+ skipped' "$WORK/$name.log" && note="$note (SKIPPED tests: not a pass)" ;;
    eval-*) note="$note: $(grep -E '^(PASS|FAIL)' "$WORK/$name.log" | tail -1)" ;;
  esac
  SUMMARY+=("$(printf '%-12s %s [%d s]' "$name" "$note" $((SECONDS - start)))")
  tail -3 "$WORK/$name.log"
  summary
}

step pytest-gpu 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/decoder/test_tensor_parallel.py
cp "$WORK/pytest-gpu.log" "$OUT/pytest-gpu.log"

step eval-exact 120 python3 benchmarks/eval_devices_check.py "${EVAL[@]}" --out "$WORK/eval-exact"
step eval-fast 120 python3 benchmarks/eval_devices_check.py "${EVAL[@]}" --fast --out "$WORK/eval-fast"
cat "$WORK/eval-exact.log" "$WORK/eval-fast.log" > "$OUT/eval-devices.txt" 2>/dev/null

step tp-float32 330 python3 benchmarks/tp_speed.py --dtype float32 "${TP[@]}" --out "$WORK/tp-float32"
[ -f "$WORK/tp-float32/tp_speed.md" ] && cp "$WORK/tp-float32/tp_speed.md" "$OUT/tp_speed-float32.md"

if [ $((DEADLINE - (SECONDS - T0))) -ge 150 ]; then
  step tp-bfloat16 200 python3 benchmarks/tp_speed.py --dtype bfloat16 "${TP_BF16[@]}" --out "$WORK/tp-bfloat16"
  [ -f "$WORK/tp-bfloat16/tp_speed.md" ] && cp "$WORK/tp-bfloat16/tp_speed.md" "$OUT/tp_speed-bfloat16.md"
else
  SUMMARY+=("$(printf '%-12s skipped: fewer than 150 s left' tp-bfloat16)")
fi

summary
tar -czf "$OUT/work.tar.gz" -C "$WORK" --exclude='ckpt*' --exclude='logits-*.pt' --exclude='cache' \
  --exclude='tiny-llama' . 2>/dev/null
echo
cat "$OUT/summary.txt"
