# Sourced by the GPU round scripts: stages that run once each, under one deadline, resumable.
# Needs $ROUND (the state folder: STAGE.done, STAGE.log) and $deadline (epoch seconds).
# DEADLINE_AT (epoch seconds) overrides DEADLINE_S, so scripts chained in one device call share it.
deadline="${DEADLINE_AT:-$(( $(date +%s) + ${DEADLINE_S:-560} ))}"

left() { echo $(( deadline - $(date +%s) - 20 )); }
# run STAGE CMD…: once; under the time left; marks STAGE done only when CMD succeeds
run() {
  local stage="$1"; shift
  [ -f "$ROUND/$stage.done" ] && return 0
  local t; t=$(left)
  if [ "$t" -lt 30 ]; then echo "[$stage] not started: ${t}s left"; return 1; fi
  echo "[$stage] start $(date -u +%T), ${t}s left"
  local t0=$SECONDS
  if timeout "$t" "$@" > >(tee -a "$ROUND/$stage.log") 2>&1; then
    echo "$(( SECONDS - t0 ))" > "$ROUND/$stage.done"; echo "[$stage] done in $(( SECONDS - t0 ))s"
  else
    echo "[$stage] stopped (rc $?) after $(( SECONDS - t0 ))s"; return 1
  fi
}
