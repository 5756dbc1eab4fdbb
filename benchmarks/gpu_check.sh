#!/usr/bin/env bash
# One-call GPU check, for a session that is lent a GPU for a few minutes. Run from the repository root:
#
#   benchmarks/gpu_check.sh [--out FILE] [--budget SECONDS] [--dry-run]
#
# Steps, each with its own time limit, all output appended to one file (default gpu_check-<host>-<date>.txt):
#   1. environment: nvidia-smi, nvcc, torch and its CUDA
#   2. build the extension (spqr_run.ops.ext.load_extension), for the GPUs present
#   3. CUDA tests: tests/test_kernels.py -k cuda (every kernel path against the reference, graphs), and the
#      real-model kernel check (tests/test_real_model_kernels.py -k cuda) when that file exists
#   4. kernel benchmark, the table of issue #11: benchmarks/kernel_bench.py --graph --batches 1 4 16 512 (every model
#      shape; CUDA graphs of many back-to-back launches, weight sets rotated through more memory than L2,
#      device-event timing, cuBLAS fp16 in the same run)
#   5. compute-sanitizer memcheck and racecheck on the first few CUDA cases of the odd-shape test (found by
#      pytest --collect-only, so renamed tests are still found), when the tool exists
#   6. spqr-bench --synthetic llama-7b, and --synthetic llama-30b --gpu-memory 24GiB
# The whole run stops at --budget seconds (default 480: 8 minutes); a step that times out is recorded as such and
# the next one starts. Exit status: 0 when every step that ran passed, 1 otherwise. --dry-run parses the
# arguments, prints the plan and the commands, and exits without touching a GPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

out=""
budget=480
dry_run=0
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --out)
      [ $# -ge 2 ] || { echo "gpu_check: --out needs a file name" >&2; exit 2; }
      out=$2
      shift 2
      ;;
    --budget)
      if [ $# -lt 2 ] || ! [[ $2 =~ ^[0-9]+$ ]]; then
        echo "gpu_check: --budget needs a whole number of seconds" >&2
        exit 2
      fi
      budget=$2
      shift 2
      ;;
    --dry-run)
      dry_run=1
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "gpu_check: unknown argument '$1' (see --help)" >&2
      exit 2
      ;;
  esac
done
[ -n "$out" ] || out="gpu_check-$(hostname -s 2>/dev/null || echo host)-$(date -u +%Y%m%dT%H%M%SZ).txt"

py=${PYTHON:-python}
command -v "$py" >/dev/null 2>&1 || py=python3
start=$(date +%s)
failed=0

# step NAME LIMIT CMD...: run CMD with at most LIMIT seconds (less if the budget is nearly spent), log to $out
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - ($(date +%s) - start)))
  [ "$limit" -gt "$left" ] && limit=$left
  {
    echo
    echo "===== $name ($(date -u +%H:%M:%S), limit ${limit} s)"
    echo "\$ $*"
  } >>"$out"
  if [ "$dry_run" -eq 1 ]; then
    echo "[dry-run] $name (limit ${limit} s): $*"
    return 0
  fi
  if [ "$limit" -le 5 ]; then
    echo "SKIPPED: the ${budget} s budget is spent" >>"$out"
    failed=1
    return 0
  fi
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$out" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "TIMEOUT after ${took} s" >>"$out"
    failed=1
  elif [ "$rc" -ne 0 ]; then
    echo "FAILED (exit $rc) after ${took} s" >>"$out"
    failed=1
  else
    echo "OK in ${took} s" >>"$out"
  fi
  echo "gpu_check: $name: $(tail -n 1 "$out")"
}

echo "gpu_check: writing $out (budget ${budget} s)"
: >"$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step "environment" 20 bash -c "nvidia-smi; command -v nvcc && nvcc --version | tail -n 2; \
  $py -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
  torch.cuda.is_available() and torch.cuda.get_device_name(0))'"

step "build extension" 110 "$py" -c "
import sys, time, torch
from spqr_run.ops import ext
assert torch.cuda.is_available(), 'no CUDA device visible to torch'
t = time.time()
mod = ext.load_extension()
assert mod is not None, 'the extension did not build (the warning above says why)'
print(f'built and loaded in {time.time() - t:.1f} s:', mod.__file__)
"

step "CUDA tests" 120 "$py" -m pytest -q -p no:cacheprovider -x tests/test_kernels.py -k "cuda"
if [ -f tests/test_real_model_kernels.py ]; then
  step "real-model kernels" 60 "$py" -m pytest -q -p no:cacheprovider -x tests/test_real_model_kernels.py -k "cuda"
fi

step "kernel benchmark (issue #11 table, CUDA graphs)" 150 "$py" benchmarks/kernel_bench.py --graph --batches 1 4 16 512

if command -v compute-sanitizer >/dev/null 2>&1 || [ "$dry_run" -eq 1 ]; then
  # Six CUDA cases of the odd-shape test spread over its list (bit widths, outliers, row counts), whatever its name.
  mapfile -t all < <("$py" -m pytest --collect-only -q -p no:cacheprovider tests/test_kernels.py \
    -k "cuda and odd_shapes" 2>/dev/null | grep '::')
  cases=()
  for ((i = 0; i < ${#all[@]}; i += (${#all[@]} + 5) / 6)); do cases+=("${all[$i]}"); done
  if [ "${#cases[@]}" -eq 0 ]; then
    echo "compute-sanitizer: no CUDA odd-shape cases collected from tests/test_kernels.py" >>"$out"
    failed=1
  fi
  for tool in memcheck racecheck; do
    [ "${#cases[@]}" -gt 0 ] || break
    step "compute-sanitizer $tool" 45 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$py" -m pytest -q -p no:cacheprovider "${cases[@]}"
  done
else
  echo "compute-sanitizer not found: memcheck/racecheck skipped" >>"$out"
fi

step "spqr-bench llama-7b" 40 "$py" -m spqr_run.cli.bench --synthetic llama-7b
step "spqr-bench llama-30b 24GiB" 40 "$py" -m spqr_run.cli.bench --synthetic llama-30b --gpu-memory 24GiB

echo "gpu_check: done in $(($(date +%s) - start)) s; results in $out"
exit "$failed"
