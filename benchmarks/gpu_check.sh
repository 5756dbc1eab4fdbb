#!/usr/bin/env bash
# One-call GPU check, for a session that is lent a GPU for a few minutes. Run from the repository root:
#
#   benchmarks/gpu_check.sh [--out FILE] [--budget SECONDS] [--wheels DIR] [--dry-run]
#
# Steps, each with its own time limit, all output appended to one file (default gpu_check-<host>-<date>.txt):
#   1. environment: nvidia-smi, nvcc, torch and its CUDA, torch's NVRTC
#   2. package: the wheel of this checkout as a release builds it (`pip wheel`: setup.py compiles the cubins for
#      sm_80/86/89/90 with this machine's nvcc), unless dist/ already holds one built elsewhere
#   3. user install: a new venv over the system site-packages (torch's CUDA wheel and the NVRTC it installs, as a
#      pip user has them), `pip install --no-index --no-deps` of that wheel and of the wheels in --wheels DIR
#      (default .whl/: the project's dependencies this machine lacks, e.g. gguf, prompt_toolkit, wcwidth), with
#      no CUDA toolkit on PATH (nvcc's directories removed, CUDA_HOME unset) from here on; then
#      `spqr-run kernels show`, and a check that the prebuilt cubin path is taken
#   4. delivery: benchmarks/gpu_delivery.py against the installed package: module load time (prebuilt), first-use
#      NVRTC (compile + cache write + load) and a cache hit, host time per launch and per launch in a CUDA graph,
#      NVRTC's outputs against the prebuilt ones
#   5. CUDA tests of the installed package (a copy of tests/, kernels/testing/, benchmarks/ outside the checkout,
#      so `import spqr_run` is the wheel): tests/test_kernels.py -k cuda (every kernel path against the
#      reference, graphs), test_gpu_launch.py, the real-model kernel check when that file exists
#   6. kernel benchmark, the table of issue #11: benchmarks/kernel_bench.py --graph --batches 1 4 16 512
#   7. spqr-bench --synthetic llama-7b, and --synthetic llama-30b --gpu-memory 24GiB (they print the GPU path)
#   8. the CUDA tests on the NVRTC path (SPQR_RUN_KERNELS=nvrtc): model shapes and bias cases
#   9. compute-sanitizer memcheck and racecheck on the first few CUDA cases of the odd-shape test, when the tool
#      exists
# The whole run stops at --budget seconds (default 480: 8 minutes); a step that times out is recorded as such and
# the next one starts. Exit status: 0 when every step that ran passed, 1 otherwise. --dry-run parses the
# arguments, prints the plan and the commands, and exits without touching a GPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

out=""
budget=480
dry_run=0
wheels=.whl
usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; }
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
    --wheels)
      [ $# -ge 2 ] || { echo "gpu_check: --wheels needs a directory" >&2; exit 2; }
      wheels=$2
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
out=$(realpath "$out")
repo=$PWD
work=$(mktemp -d -t spqr-gpu-check.XXXXXX)
venv=$work/venv
# no CUDA toolkit for the user's steps: PATH without nvcc's directories, no CUDA_HOME / CUDA_PATH / NVCC
user_path=$(echo "$PATH" | tr ':' '\n' | while read -r d; do [ -x "$d/nvcc" ] || echo "$d"; done | paste -sd: -)
as_user=(env -u CUDA_HOME -u CUDA_PATH -u NVCC "PATH=$venv/bin:$user_path")  # a command prefix (timeout runs it)

step "environment" 20 bash -c "nvidia-smi; command -v nvcc && nvcc --version | tail -n 2; \
  $py -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
  torch.cuda.is_available() and torch.cuda.get_device_name(0))'; \
  $py -m pip list 2>/dev/null | grep -i -E 'nvidia-cuda-(nvrtc|runtime)|^torch '"

# 2. the packaging step: a wheel with the cubins (a wheel already in dist/, built by CI or a release, wins)
step "package (pip wheel: nvcc cubins for sm_80/86/89/90)" 150 bash -c "
  set -e
  if ls dist/spqr_run-*.whl >/dev/null 2>&1; then cp dist/spqr_run-*.whl '$work/'; echo 'using' dist/spqr_run-*.whl;
  else SPQR_RUN_CUBINS=require $py -m pip wheel -q --no-deps --no-build-isolation -w '$work' . ; fi
  $py -m zipfile -l '$work'/spqr_run-*.whl | grep -E 'cubins/|gpu/src/'"

# 3. as a user: a venv over the system packages (torch's CUDA wheel), the wheel, no toolkit on PATH
step "user install (no CUDA toolkit on PATH)" 60 bash -c "
  set -e
  $py -m venv --system-site-packages '$venv'
  extra=''; [ -d '$wheels' ] && extra=\$(ls '$wheels'/*.whl 2>/dev/null || true)
  env -u CUDA_HOME -u CUDA_PATH -u NVCC PATH='$venv/bin:$user_path' \
    '$venv/bin/python' -m pip install -q --no-index --no-deps '$work'/spqr_run-*.whl \$extra
  cd '$work' && env -u CUDA_HOME -u CUDA_PATH -u NVCC PATH='$venv/bin:$user_path' '$venv/bin/spqr-run' kernels show
  command -v nvcc || true"
step "prebuilt path taken" 30 "${as_user[@]}" bash -c "cd '$work' && python -c \"
import torch
from spqr_run.ops import kernel_path
p = kernel_path(torch.device('cuda', 0), (3, 3))
print(p)
assert p.name == 'prebuilt cubin', 'the installed wheel does not take the prebuilt path'
\""

# 4. what only a GPU shows about the delivery: load times, first-use NVRTC, launch overhead
step "delivery: module load, first-use NVRTC, launch cost" 90 "${as_user[@]}" bash -c \
  "cd '$work' && python '$repo/benchmarks/gpu_delivery.py' --expect-prebuilt"

# 5. the CUDA tests of the installed package (a copy of the test tree, so spqr_run is the wheel's)
mkdir -p "$work/co" && cp -r tests kernels benchmarks "$work/co/" 2>/dev/null
step "CUDA tests (installed wheel)" 120 "${as_user[@]}" bash -c \
  "cd '$work/co' && python -m pytest -q -p no:cacheprovider -x tests/test_kernels.py tests/test_gpu_launch.py -k cuda"
if [ -f tests/test_real_model_kernels.py ]; then
  step "real-model kernels" 60 "${as_user[@]}" bash -c \
    "cd '$work/co' && python -m pytest -q -p no:cacheprovider -x tests/test_real_model_kernels.py -k cuda"
fi

step "kernel benchmark (issue #11 table, CUDA graphs)" 150 "${as_user[@]}" python benchmarks/kernel_bench.py --graph --batches 1 4 16 512

step "spqr-bench llama-7b" 40 "${as_user[@]}" bash -c "cd '$work' && spqr-bench --synthetic llama-7b"
step "spqr-bench llama-30b 24GiB" 40 "${as_user[@]}" bash -c "cd '$work' && spqr-bench --synthetic llama-30b --gpu-memory 24GiB"

# 8. the NVRTC path on this GPU: the kernels compiled at first use, checked against the reference
step "CUDA tests on the NVRTC path" 60 "${as_user[@]}" env SPQR_RUN_KERNELS=nvrtc SPQR_RUN_KERNEL_CACHE="$work/nvrtc-cache" \
  bash -c "cd '$work/co' && python -m pytest -q -p no:cacheprovider -x tests/test_kernels.py -k 'cuda and (model_shapes or bias)'"

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
    step "compute-sanitizer $tool" 45 "${as_user[@]}" bash -c "cd '$work/co' && \
      $(command -v compute-sanitizer || echo compute-sanitizer) --tool $tool --error-exitcode 9 \
      python -m pytest -q -p no:cacheprovider ${cases[*]}"
  done
else
  echo "compute-sanitizer not found: memcheck/racecheck skipped" >>"$out"
fi

rm -rf "$work"
echo "gpu_check: done in $(($(date +%s) - start)) s; results in $out"
exit "$failed"
