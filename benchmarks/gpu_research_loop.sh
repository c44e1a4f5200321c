#!/usr/bin/env bash
# The research loop on one GPU machine that has no network: detect the QR heads, calibrate DySCO's
# knobs on dev examples, then evaluate the calibrated profile, the published knobs and vanilla on
# held-out examples. docs/results.md has the runs this produced and the recipe around them (the
# weights arrive in <= 60 MB pieces, the wheels as files):
#
#   bash benchmarks/gpu_research_loop.sh detect PARTS_DIR OUT [headfinder detect options...]
#   bash benchmarks/gpu_research_loop.sh calibrate PARTS_DIR OUT [calibrate options...]
#   bash benchmarks/gpu_research_loop.sh import ARCHIVE
#   bash benchmarks/gpu_research_loop.sh eval OUT [dysco eval options...]
#
# `detect` and `calibrate` first join PARTS_DIR/part* into the model cache as the catalogue's kept
# GGUF of MODEL (default smollm2-135m; the checkpoint is rebuilt from it on load, exactly as `dysco
# models pull` would) unless it is there already, and check it against the catalogue's pinned
# sha256. `detect` registers the head scores (a new profile version). `calibrate` runs a sqlite study
# and a registry under /tmp (they outlive the call while the machine stays warm, so a rerun of the
# same command resumes the study), and copies into OUT the study, the result JSON and the registered
# profile as an archive. `import` adds a profile archive to that registry; `eval` runs `dysco eval`
# against it. Options after OUT go to the command unchanged, e.g. for a long-context study on the
# fast path (issue 12):
#
#   MODEL=qwen2.5-coder-0.5b bash benchmarks/gpu_research_loop.sh calibrate PARTS_DIR OUT --dev kv \
#       --context 16384 --examples 24 --trials 30 --batch-size 12 --fast --device cuda --dtype bfloat16
set -euo pipefail
cd "$(dirname "$0")/.."
export DYSCO_CACHE="${DYSCO_CACHE:-/tmp/dysco-cache}" DYSCO_REGISTRY="${DYSCO_REGISTRY:-/tmp/dysco-registry}"
MODEL="${MODEL:-smollm2-135m}"
py() { python3 -c "import sys; from $1 import main; sys.exit(main(sys.argv[1:]))" "${@:2}"; }
# `dysco registry …` / `dysco eval …` from a checkout that is not pip-installed (no entry points there).
dysco() { python3 -c "
import argparse, sys
from calibration.evaluation.cli import register_cli as add_eval
from decoder.registry_cli import register_cli as add_registry
parser = argparse.ArgumentParser(prog='dysco')
commands = parser.add_subparsers(dest='command', required=True)
add_registry(commands); add_eval(commands)
args = parser.parse_args(sys.argv[1:])
sys.exit(int(args.func(args) or 0))" "$@"; }

join() {
  read -r gguf sha < <(python3 -c "from decoder.catalogue import get_entry, source_path as p
print(p('$MODEL'), get_entry('$MODEL').gguf_sha256)")
  mkdir -p "$(dirname "$gguf")"
  [ -f "$gguf" ] || cat "$1"/part* > "$gguf"
  echo "$sha  $gguf" | sha256sum -c -
}

case "${1:-}" in
  detect)
    parts="$2" out="$3"; shift 3
    join "$parts"; mkdir -p "$out"
    py headfinder.cli detect --model "$MODEL" --registry "$DYSCO_REGISTRY" --register --out "$out/heads" --no-progress "$@" \
      | tee "$out/detect.txt"
    ;;
  calibrate)
    parts="$2" out="$3"; shift 3
    join "$parts"; mkdir -p "$out"
    py calibration.cli --model "$MODEL" --storage "sqlite:////tmp/dysco-study.db" --no-tracking \
      --registry "$DYSCO_REGISTRY" --json "$@" | tee "$out/calibrate.json"
    cp /tmp/dysco-study.db "$out/study.db"
    ref=$(python3 -c "import json; print(json.load(open('$out/calibrate.json'))['profile_ref'])")
    dysco registry export --registry "$DYSCO_REGISTRY" "$ref" "$out/profile.tar.gz"
    ;;
  import)
    dysco registry import --registry "$DYSCO_REGISTRY" "$2"
    ;;
  eval)
    out="$2"; shift 2
    dysco eval --model "$MODEL" --registry "$DYSCO_REGISTRY" --out "$out" "$@"
    ;;
  *)
    sed -n 2,23p "$0"; exit 2 ;;
esac
