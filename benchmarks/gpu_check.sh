#!/usr/bin/env bash
# The one command a GPU session runs on the device machine, from the repo root:
#
#     OUT=<folder> bash benchmarks/gpu_check.sh
#
# Fits in about 6 minutes of a 15-minute device budget (GPU_CHECK_BUDGET_S,
# default 360 s, shared by the steps below: build <= 120 s, tests <= 120 s, the
# benchmark <= 110 s, bench_cuda only with 40 s to spare; a step whose share is
# spent is skipped and named as a failure):
#
# 1. build pyquant._C with CUDA for this GPU's architecture only (nvidia-smi
#    compute_cap: 9.0 -> 90a, 8.0 -> 80, ...), into pyquant/, incrementally (the
#    build folder build/gpu_check/build-<arch> is kept between runs); on 90a with
#    the CUTLASS kernels, whose headers come from nvidia-cutlass: installed, or a
#    wheel carried in .whl/ (cutlass_headers below);
# 2. the GPU tests of the kernels this run may verify, one pytest process per file
#    in parallel: tests/gpu/*, the tests marked gpu elsewhere, and the Triton kernel
#    tests (tests/triton/test_triton_{qmatmul,packed,dequant}.py, compiled on the GPU);
# 3. the graph-timed benchmark (benchmarks/suite.py: CUDA graphs over weight copies
#    > 4x L2, median and p10/p90 of >= 50 replays, cuBLAS fp16 / tinygemm timed the
#    same way) on 4096x4096, 14336x4096, 4096x14336 and 28672x8192 at M in
#    {1, 4, 16, 64, 128, 512, 2048}, Int4 g128, with a PNG of speedup vs M and a
#    two-run agreement check;
# 4. benchmarks/bench_cuda.py --quick for the W8A8 GEMM and the dequantize kernels
#    (when the budget allows);
# 5. verified kernels from every JUnit report of this run, with the source hash of
#    each kernel (benchmarks/verified.py), applied to pyquant/ops/verified_kernels.json
#    (GPU runs only; review the diff before committing it);
# 6. benchmarks/results/<gpu>.json, <gpu>.md (per step: counts and the names of
#    failed tests), <gpu>.png, <gpu>-verified.json; with $OUT set, those, the log
#    and a tarball of the raw outputs (every step's JUnit XML and log) are copied there.
#
# Every step writes a JUnit report (build/gpu_check/junit-<step>.xml): pytest's own,
# or one testcase per step (benchmarks/gpu_check_report.py), so a failure is named
# in the results even when a time limit killed it.
#
# Environment: OUT, PYTHON (default python3), PYQUANT_CUDA_ARCHS (override the
# detected arch), GPU_CHECK_BUDGET_S, GPU_CHECK_JOBS (build jobs, default nproc),
# GPU_CHECK_ALLOW_NO_GPU=1 (exercise the script without a GPU: CPU build unless
# PYQUANT_CUDA_ARCHS is set, GPU steps skipped, nothing verified),
# GPU_CHECK_SKIP_BUILD=1, GPU_CHECK_WORK (scratch folder, default build/gpu_check),
# GPU_CHECK_RESULTS (results folder, default benchmarks/results).
# Exit status: 0 when every step passed, 1 otherwise, 2 when no GPU.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
WORK="${GPU_CHECK_WORK:-$ROOT/build/gpu_check}"
RESULTS="${GPU_CHECK_RESULTS:-$ROOT/benchmarks/results}"
BUDGET="${GPU_CHECK_BUDGET_S:-360}"
START=$(date +%s)
REPORT=(benchmarks/gpu_check_report.py)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

gpu_present() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
elapsed() { echo $(( $(date +%s) - START )); }
# Seconds left for a step: what remains of the budget minus a reserve, capped at $1.
limit() {
  local cap=$1 reserve=${2:-20} left
  left=$(( BUDGET - $(elapsed) - reserve ))
  if (( left > cap )); then left=$cap; fi
  echo "$left"
}
banner() { printf '\n=== [%3ss] %s\n' "$(elapsed)" "$*"; }

# run_step NAME SECONDS CMD...: runs CMD (a command or one of the functions below)
# under a time limit, its output in $WORK/step-NAME.log and on the terminal, then
# writes junit-NAME.xml naming the step, failed when CMD failed or timed out.
run_step() {
  local name=$1 secs=$2 t0 rc
  shift 2
  banner "$name (limit ${secs}s)"
  t0=$(date +%s)
  if (( secs < 10 )); then
    echo "(skipped: time budget spent)" | tee "$WORK/step-$name.log"
    rc=124
  else
    timeout --signal=TERM --kill-after=10 "$secs" "$@" 2>&1 | tee "$WORK/step-$name.log"
    rc=${PIPESTATUS[0]}
  fi
  "$PY" "${REPORT[@]}" step "$name" "$rc" "$(( $(date +%s) - t0 ))" "$WORK/step-$name.log" "$WORK/junit-$name.xml"
  return "$rc"
}

# step NAME CAP RESERVE CMD...: run_step with the budget's share (limit CAP RESERVE).
step() {
  local name=$1 secs
  secs=$(limit "$2" "$3")
  shift 3
  run_step "$name" "$secs" "$@"
}

# skipped_step NAME REASON: a step that could not run, named as a failure.
skipped_step() {
  banner "$1"
  echo "(skipped: $2)" | tee "$WORK/step-$1.log"
  "$PY" "${REPORT[@]}" step "$1" 1 0 "$WORK/step-$1.log" "$WORK/junit-$1.xml"
}

# The CUTLASS headers the sm_90a kernels build with (csrc/cuda/*_sm90.cu): those
# setup.py would find (PYQUANT_CUTLASS_DIR, an installed nvidia-cutlass), else the
# headers of a wheel carried to the machine in .whl/ (it has no network:
# `pip download --no-deps "nvidia-cutlass>=4.2,<4.3" -d .whl` beforehand, and name
# .whl in the run's carry), unpacked into $WORK/cutlass. Prints "" when none.
cutlass_headers() {
  "$PY" - "$ROOT" "$WORK/cutlass" <<'PYEOF'
import glob, importlib.util, sys, zipfile
from pathlib import Path
root, dest = Path(sys.argv[1]), Path(sys.argv[2])
spec = importlib.util.spec_from_file_location("cb", root / "triton_kernels" / "tools" / "cuda_build.py")
cb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cb)
inc = cb.cutlass_include()
wheels = sorted(glob.glob(str(root / ".whl" / "nvidia_cutlass-*.whl")))
if inc is None and wheels:
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extractall(dest, [n for n in z.namelist() if n.startswith(("cutlass_library/source/include/",
                                                                    "cutlass_library/source/tools/util/include/"))])
    inc = str(dest / "cutlass_library" / "source" / "include")
print(inc or "")
PYEOF
}

# the build, as a script of its own so that timeout(1) can run it
build() {
  local bdir="$WORK/build-${ARCH:-cpu}" pybind_dir cuda_flags=() cutlass
  pybind_dir=$("$PY" -c "import pybind11; print(pybind11.get_cmake_dir())") || return 1
  if [[ -n "$ARCH" ]]; then
    cutlass=$(cutlass_headers) || return 1
    echo "CUTLASS headers: ${cutlass:-(none: no sm_90a CUTLASS kernels)}"
    cuda_flags=(-DPYQUANT_CUDA=ON "-DPYQUANT_CUDA_ARCHS=$ARCH" "-DCMAKE_CUDA_COMPILER=$(command -v nvcc)"
                "-DPYQUANT_CUTLASS_INCLUDE=$cutlass")
  else
    cuda_flags=(-DPYQUANT_CUDA=OFF)
  fi
  cmake -S "$ROOT" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release "-DPYQUANT_OUTPUT_DIR=$ROOT/pyquant" \
    "-DPython3_EXECUTABLE=$(command -v "$PY")" "-Dpybind11_DIR=$pybind_dir" "${cuda_flags[@]}" \
    && cmake --build "$bdir" --parallel "${GPU_CHECK_JOBS:-$(nproc)}" \
    && "$PY" -c "import pyquant._C as c; print('pyquant._C: cuda_compiled =', c.cuda_compiled(), '| arches =', c.cuda_arches())"
}

# One pytest process per test file (a sticky CUDA error stays in its file), in parallel.
gpu_tests() {
  local secs files=() f name pids=() names=() t0 i rc status=0
  secs=$(limit 120 130)
  banner "GPU tests (limit ${secs}s per file, in parallel)"
  files=(tests/gpu/test_*.py tests/triton/test_triton_qmatmul.py tests/triton/test_triton_packed.py
         tests/triton/test_triton_dequant.py)
  t0=$(date +%s)
  for f in "${files[@]}" elsewhere; do
    if [[ "$f" == elsewhere ]]; then
      name="gpu-elsewhere"
      set -- tests -m gpu --ignore=tests/gpu
    else
      name="gpu-$(basename "$f" .py)"
      set -- "$f"
    fi
    if (( secs < 10 )); then
      echo "(skipped: time budget spent)" >"$WORK/step-$name.log"
      "$PY" "${REPORT[@]}" step "$name" 124 0 "$WORK/step-$name.log" "$WORK/junit-$name.xml"
      continue
    fi
    OMP_NUM_THREADS=2 timeout --signal=TERM --kill-after=10 "$secs" "$PY" -m pytest "$@" -q -rfE \
      -p no:cacheprovider --continue-on-collection-errors --junitxml="$WORK/junit-$name.xml" \
      >"$WORK/step-$name.log" 2>&1 &
    pids+=("$!")
    names+=("$name")
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    name=${names[$i]}
    "$PY" "${REPORT[@]}" pytest-step "$name" "$rc" "$(( $(date +%s) - t0 ))" "$WORK/step-$name.log" \
      "$WORK/junit-$name.xml"
    if (( rc != 0 && rc != 5 )); then status=1; fi
    echo "--- $name: exit $rc"
    tail -n 8 "$WORK/step-$name.log"
  done
  return "$status"
}

main() {
  local have_gpu=0 cap="" gpu_name="no-gpu" build_ok=0 status=0
  ARCH=""

  banner "device"
  if gpu_present; then
    have_gpu=1
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' ')
    gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
  else
    echo "no NVIDIA GPU visible (nvidia-smi missing or failing): GPU steps are skipped, nothing is verified"
  fi
  gpu_name=$(printf '%s' "$gpu_name" | sed -E 's/[^A-Za-z0-9._-]+/_/g; s/^_+//; s/_+$//')
  echo "$gpu_name" >"$WORK/gpu_name"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| available', torch.cuda.is_available())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"
  if [[ -n "${PYQUANT_CUDA_ARCHS:-}" ]]; then
    ARCH="$PYQUANT_CUDA_ARCHS"
  elif [[ -n "$cap" ]]; then
    ARCH="${cap/./}"
    # Hopper: the arch-specific target (wgmma etc. need it; plain code runs the same).
    if [[ "$ARCH" == 90 ]]; then ARCH=90a; fi
  fi
  echo "CUDA arch: ${ARCH:-(none: CPU-only build)}"

  if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
    banner "build: skipped by GPU_CHECK_SKIP_BUILD"
    build_ok=1
  elif step build 120 240 bash -c "$(declare -f cutlass_headers build); ARCH='$ARCH' WORK='$WORK' ROOT='$ROOT' PY='$PY' build"; then
    build_ok=1
  else
    status=1
  fi

  if (( build_ok && have_gpu )); then
    gpu_tests || status=1
    mkdir -p "$WORK/suite" "$WORK/bench"
    step benchmark 110 20 "$PY" benchmarks/suite.py --device cuda --formats int4_g128_asym \
      --shapes 4096x4096,14336x4096,4096x14336,28672x8192 --m 1,4,16,64,128,512,2048 --repeat-check \
      --out "$WORK/suite" || status=1
    if (( $(limit 60 10) >= 40 )); then
      step bench_cuda 60 10 "$PY" benchmarks/bench_cuda.py --quick --skip gemv --out "$WORK/bench" || status=1
    else
      echo "(bench_cuda left out: the budget is spent; the suite above has the GEMV rows)"
    fi
    # the tensor-core int4 kernel (IntMMA layout) against cuBLAS fp16 in the same process
    if (( $(limit 45 5) >= 30 )); then
      mkdir -p "$WORK/suite-mma"
      step benchmark-mma 45 5 "$PY" benchmarks/suite.py --device cuda --formats int4mma_g128_asym \
        --shapes 4096x4096,14336x4096 --m 1,16,64 --out "$WORK/suite-mma" || status=1
    else
      echo "(benchmark-mma left out: the budget is spent)"
    fi
  elif (( ! build_ok )); then
    skipped_step gpu-tests "the build failed"
    skipped_step benchmark "the build failed"
    status=1
  else
    echo "(no GPU: tests and benchmarks skipped)"
  fi

  local junits=() no_gpu=()
  for f in "$WORK"/junit-*.xml; do [[ -f "$f" ]] && junits+=("$f"); done
  if (( ! have_gpu )); then no_gpu=(--no-gpu); fi
  run_step verified 60 "$PY" benchmarks/verified.py from-junit "${junits[@]}" --device "$gpu_name" "${no_gpu[@]}" \
    --out "$RESULTS/$gpu_name-verified.json" \
    --extra "{\"cuda_arch\": \"$ARCH\", \"git_commit\": \"$(git rev-parse HEAD 2>/dev/null || echo unknown)\"}" \
    || status=1
  if (( have_gpu && build_ok )) && [[ -f "$RESULTS/$gpu_name-verified.json" ]]; then
    "$PY" benchmarks/verified.py apply "$RESULTS/$gpu_name-verified.json" || status=1
  fi

  banner "summary"
  "$PY" "${REPORT[@]}" summary "$WORK" "$RESULTS" "$gpu_name" "$ARCH"
  local png
  png=$(ls "$WORK"/suite/*.png 2>/dev/null | head -n1)
  if [[ -n "$png" ]]; then cp "$png" "$RESULTS/$gpu_name.png"; fi
  return "$status"
}

if ! gpu_present && [[ "${GPU_CHECK_ALLOW_NO_GPU:-0}" != 1 ]]; then
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi missing or failing). This script needs a GPU machine;" >&2
  echo "gpu_check: set GPU_CHECK_ALLOW_NO_GPU=1 to exercise it without one (nothing is verified then)." >&2
  exit 2
fi
mkdir -p "$WORK" "$RESULTS"
# Reports of an earlier run on this machine must not count (the build folders stay: incremental).
rm -rf "$WORK/bench" "$WORK/suite" "$WORK"/junit-*.xml "$WORK"/step-*.log "$WORK/gpu_name"
main 2>&1 | tee "$WORK/gpu_check.log"
status=${PIPESTATUS[0]}

gpu_name=$(cat "$WORK/gpu_name" 2>/dev/null || echo no-gpu)
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  cp "$WORK/gpu_check.log" "$OUT/" 2>/dev/null
  for f in "$gpu_name.json" "$gpu_name.md" "$gpu_name.png" "$gpu_name-verified.json"; do
    if [[ -f "$RESULTS/$f" ]]; then cp "$RESULTS/$f" "$OUT/"; fi
  done
  cp pyquant/ops/verified_kernels.json "$OUT/" 2>/dev/null
  tar -czf "$OUT/gpu_check_raw.tar.gz" -C "$WORK" --exclude='build-*' . 2>/dev/null
  echo "copied results to $OUT: $(find "$OUT" -maxdepth 1 -type f -printf '%f ' 2>/dev/null)"
fi
echo "gpu_check: exit status $status after $(elapsed)s"
exit "$status"
