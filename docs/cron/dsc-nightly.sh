#!/usr/bin/env bash
# Tonight's `dsc run` for cron (docs/scheduling.md). Run it under `flock -n` so that two ticks never
# overlap. It resumes a run that has not finished (from any night) before it starts a new one, so
# hourly ticks in a window finish a run that crashed or was stopped, and do nothing once it is done.
#
# Exit code: dsc's own (0 done, 1 failure, 2 bad input, 3 interrupted), 0 when there was nothing to do.
# It prints (so cron mails MAILTO) only when a human is needed: exit 1 or 2.
set -uo pipefail

recipe=${DSC_RECIPE:-/opt/dsc/recipes/nightly.yaml}
runs=${DSC_RUNS:-/srv/dsc/runs}
logs=${DSC_LOGS:-/var/log/dsc}
export DSC_CACHE_DIR=${DSC_CACHE_DIR:-/srv/dsc/cache}   # tokenized data, shared by all nights
export HF_HOME=${HF_HOME:-/srv/dsc/hf}                  # hub cache, if the teacher is a hub id
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}            # the cores this job may use

mkdir -p "$runs" "$logs"
pending=$runs/PENDING                  # names the run directory of a run that has not finished
tonight=$runs/$(date +%Y-%m-%d)
if [[ -s $pending ]]; then
    out=$(<"$pending")
elif [[ -e $tonight.done ]]; then
    exit 0                             # tonight's run finished at an earlier tick
else
    out=$tonight
    echo "$out" > "$pending"
fi
log=$logs/$(basename "$out").jsonl

# JSON lines on stderr go to the log; stdout (the report's path) is not JSON: keep it out.
dsc --log-format json run "$recipe" -o "$out" 2>>"$log" >/dev/null
code=$?
case $code in
    0) touch "$out.done"; rm -f "$pending" ;;
    3) ;;                              # interrupted (SIGTERM, Ctrl-C): the next tick resumes
    *) echo "dsc nightly: exit $code for $out (1: failure, rerun resumes; 2: bad input, fix it)"
       grep '"event": "error"' "$log" | tail -n 1 ;;
esac
exit $code
