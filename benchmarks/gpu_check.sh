#!/usr/bin/env bash
# The one command a GPU session runs on the device machine, from the repo root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. builds pyquant._C with CUDA for this GPU's architecture only (nvidia-smi
#    compute_cap: 9.0 -> 90a, 8.0 -> 80, ...), into pyquant/ (no pip, no network);
# 2. runs the GPU tests (tests/gpu: one pytest process per file, in parallel,
#    plus tests marked gpu elsewhere);
# 3. benchmarks the CUDA kernels (benchmarks/bench_cuda.py), the fused GPTQ update
#    (benchmarks/bench_gptq_gpu.py -> results/<gpu>-gptq.json) and, if present,
#    benchmarks/suite.py --quick --device cuda;
# 4. runs the rest of the test suite (tests needing packages missing here skip);
# 5. records which GPU kernels passed all of their tests in any of these runs:
#    benchmarks/results/<gpu>-verified.json (rules in benchmarks/verified.py;
#    apply it with `python benchmarks/verified.py apply <that file>`);
# 6. writes benchmarks/results/<gpu>.json, <gpu>.md and <gpu>.png (+ <gpu>-suite.png)
#    and, when $OUT is set, copies them there with the log and a tarball of the
#    raw outputs (junit XML, suite output): at most 8 files.
# Each step has a time limit taken from a total budget (GPU_CHECK_BUDGET_S,
# default 460 s) so the whole run fits in 8 minutes on an H100 with the build.
#
# Environment: OUT, PYTHON (default python3), PYQUANT_CUDA_ARCHS (override the
# detected arch), GPU_CHECK_BUDGET_S, GPU_CHECK_JOBS (build jobs, default nproc),
# GPU_CHECK_ALLOW_NO_GPU=1 (exercise the script without a GPU: CPU build unless
# PYQUANT_CUDA_ARCHS is set, GPU steps skipped), GPU_CHECK_SKIP_BUILD=1,
# GPU_CHECK_TESTS (test paths for step 4, default: tests), GPU_CHECK_WORK (scratch
# folder, default build/gpu_check).
# Exit status: 0 when the build and every test passed, 1 otherwise, 2 when no GPU.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${PYTHON:-python3}"
WORK="${GPU_CHECK_WORK:-$ROOT/build/gpu_check}"
RESULTS="$ROOT/benchmarks/results"
BUDGET="${GPU_CHECK_BUDGET_S:-460}"
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

gpu_present() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
elapsed() { echo $(( $(date +%s) - START )); }
# Seconds left for a step: what remains of the budget minus a reserve, capped at $1.
limit() {
  local cap=$1 reserve=${2:-30} left
  left=$(( BUDGET - $(elapsed) - reserve ))
  if (( left > cap )); then left=$cap; fi
  echo "$left"
}
step() { printf '\n=== [%3ss] %s\n' "$(elapsed)" "$*"; }
# run_limited SECONDS CMD...: runs CMD under a timeout; skips it when no time is left.
run_limited() {
  local secs=$1
  shift
  if (( secs < 10 )); then
    echo "(skipped: time budget spent)"
    return 124
  fi
  timeout --signal=TERM --kill-after=15 "$secs" "$@"
}

main() {
  local have_gpu=0 cap="" gpu_name="no-gpu" arch="" build_ok=0 gpu_tests_rc=1 rest_rc=1

  step "device"
  if gpu_present; then
    have_gpu=1
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' ')
    gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)
  else
    echo "no NVIDIA GPU visible (nvidia-smi missing or failing): GPU steps are skipped, nothing is verified"
  fi
  gpu_name=$(printf '%s' "$gpu_name" | sed -E 's/[^A-Za-z0-9._-]+/_/g; s/^_+//; s/_+$//')
  echo "$gpu_name" >"$WORK/gpu_name"
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| available', torch.cuda.is_available())"
  command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -n 2

  if [[ -n "${PYQUANT_CUDA_ARCHS:-}" ]]; then
    arch="$PYQUANT_CUDA_ARCHS"
  elif [[ -n "$cap" ]]; then
    arch="${cap/./}"
    # Hopper: the arch-specific target (wgmma etc. need it; plain code runs the same).
    if [[ "$arch" == 90 ]]; then arch=90a; fi
  fi
  echo "CUDA arch: ${arch:-(none: CPU-only build)}"

  step "build pyquant._C"
  if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
    echo "(skipped by GPU_CHECK_SKIP_BUILD)"
    build_ok=1
  else
    local bdir="$WORK/build-${arch:-cpu}" pybind_dir cuda_flags=()
    pybind_dir=$("$PY" -c "import pybind11; print(pybind11.get_cmake_dir())")
    if [[ -n "$arch" ]]; then
      cuda_flags=(-DPYQUANT_CUDA=ON "-DPYQUANT_CUDA_ARCHS=$arch" "-DCMAKE_CUDA_COMPILER=$(command -v nvcc)")
    else
      cuda_flags=(-DPYQUANT_CUDA=OFF)
    fi
    if run_limited "$(limit 300)" cmake -S "$ROOT" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
         "-DPYQUANT_OUTPUT_DIR=$ROOT/pyquant" "-DPython3_EXECUTABLE=$(command -v "$PY")" \
         "-Dpybind11_DIR=$pybind_dir" "${cuda_flags[@]}" >"$WORK/cmake-configure.log" 2>&1 \
       && run_limited "$(limit 300)" cmake --build "$bdir" --parallel "${GPU_CHECK_JOBS:-$(nproc)}"; then
      build_ok=1
    else
      echo "BUILD FAILED (configure log: $WORK/cmake-configure.log)"
      tail -n 30 "$WORK/cmake-configure.log"
    fi
  fi
  if (( build_ok )); then
    "$PY" -c "import pyquant._C as c; print('pyquant._C: cuda_compiled =', c.cuda_compiled(), '| arches =', c.cuda_arches())" \
      || build_ok=0
  fi

  step "GPU tests: one pytest process per tests/gpu file (a sticky CUDA error stays in its file), in parallel"
  if (( build_ok )); then
    local secs f name rc pids=()
    secs=$(limit 180 60)
    if (( secs >= 10 )); then
      for f in tests/gpu/test_*.py; do
        name=$(basename "$f" .py)
        OMP_NUM_THREADS=2 timeout --signal=TERM --kill-after=15 "$secs" "$PY" -m pytest "$f" -q -rfE \
          -p no:cacheprovider --continue-on-collection-errors --junitxml="$WORK/junit-gpu-$name.xml" >"$WORK/pytest-gpu-$name.log" 2>&1 &
        pids+=("$!")
      done
      # GPU-marked tests that live elsewhere (exit status 5: none there).
      OMP_NUM_THREADS=2 timeout --signal=TERM --kill-after=15 "$secs" "$PY" -m pytest tests -m gpu \
        --ignore=tests/gpu -q -rfE -p no:cacheprovider --continue-on-collection-errors --junitxml="$WORK/junit-gpu-elsewhere.xml" \
        >"$WORK/pytest-gpu-elsewhere.log" 2>&1 &
      pids+=("$!")
      gpu_tests_rc=0
      for f in "${pids[@]}"; do
        wait "$f"
        rc=$?
        if (( rc != 0 && rc != 5 )); then gpu_tests_rc=1; fi
      done
      for f in "$WORK"/pytest-gpu-*.log; do
        echo "--- ${f##*/}"
        tail -n 30 "$f"
      done
    else
      echo "(skipped: time budget spent)"
    fi
    echo "GPU tests: $([[ $gpu_tests_rc == 0 ]] && echo all passed || echo FAILURES)"
  else
    echo "(skipped: no extension)"
  fi

  step "benchmarks: bench_cuda.py"
  mkdir -p "$WORK/bench"
  if (( have_gpu && build_ok )); then
    run_limited "$(limit 80 60)" "$PY" benchmarks/bench_cuda.py --quick --reps 10 --out "$WORK/bench"
  else
    echo "(skipped: needs a GPU and the extension)"
  fi

  step "benchmarks: bench_gptq_gpu.py --quick (fused GPTQ update vs the torch loop)"
  if (( have_gpu && build_ok )); then
    run_limited "$(limit 60 60)" "$PY" benchmarks/bench_gptq_gpu.py --quick --out "$RESULTS"
  else
    echo "(skipped: needs a GPU and the extension)"
  fi

  step "benchmarks: suite.py --quick"
  mkdir -p "$WORK/suite"
  if [[ -f benchmarks/suite.py ]] && (( have_gpu && build_ok )); then
    run_limited "$(limit 150 60)" "$PY" benchmarks/suite.py --quick --device cuda --out "$WORK/suite" \
      | tee "$WORK/suite/suite.md"
  else
    echo "(skipped: benchmarks/suite.py missing, or no GPU / extension)"
  fi

  step "the rest of the test suite (not marked gpu)"
  local xdist=() tests=()
  if "$PY" -c "import xdist" >/dev/null 2>&1 && (( $(nproc) >= 8 )); then xdist=(-n 8); fi
  if [[ -n "${GPU_CHECK_TESTS:-}" ]]; then
    read -r -a tests <<<"$GPU_CHECK_TESTS"
  else
    tests=(tests)
  fi
  run_limited "$(limit 200 15)" "$PY" -m pytest "${tests[@]}" -m "not gpu" -q -rfE -p no:cacheprovider \
    --continue-on-collection-errors "${xdist[@]}" --junitxml="$WORK/junit-rest.xml"
  rest_rc=$?
  echo "test suite exit status: $rest_rc"

  step "verified kernels (every junit report of this run: tests/gpu and the rest, e.g. Triton tests on the GPU)"
  local junits=() no_gpu=()
  for f in "$WORK"/junit-*.xml; do [[ -f "$f" ]] && junits+=("$f"); done
  if (( ! have_gpu )); then no_gpu=(--no-gpu); fi
  if (( ${#junits[@]} )); then
    "$PY" benchmarks/verified.py from-junit "${junits[@]}" --device "$gpu_name" "${no_gpu[@]}" \
      --out "$RESULTS/$gpu_name-verified.json" \
      --extra "{\"cuda_arch\": \"$arch\", \"git_commit\": \"$(git rev-parse HEAD 2>/dev/null || echo unknown)\"}"
  else
    echo "(no test reports)"
  fi

  step "summary"
  "$PY" - "$WORK" "$RESULTS" "$gpu_name" "$build_ok" "$gpu_tests_rc" "$rest_rc" "$arch" <<'PYEOF'
import json, shutil, sys, xml.etree.ElementTree as ET
from pathlib import Path

work, results, gpu, build_ok, gpu_rc, rest_rc, arch = sys.argv[1:]
work, results = Path(work), Path(results)


def junit_counts(path):
    if not path.exists():
        return None
    c = {"passed": 0, "failed": 0, "skipped": 0}
    for tc in ET.parse(path).getroot().iter("testcase"):
        tags = {ch.tag for ch in tc}
        c["failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"] += 1
    return c


def merge(counts):
    out = {}
    for c in counts:
        for k, v in (c or {}).items():
            out[k] = out.get(k, 0) + v
    return out


def load(path):
    return json.loads(path.read_text()) if path.exists() else None


summary = {
    "device": gpu, "cuda_arch": arch, "build_ok": build_ok == "1",
    "gpu_tests": {"exit_status": int(gpu_rc), **merge(junit_counts(p) for p in sorted(work.glob("junit-gpu-*.xml")))},
    "test_suite": {"exit_status": int(rest_rc), **(junit_counts(work / "junit-rest.xml") or {})},
    "verified": load(results / f"{gpu}-verified.json"),
    "bench_cuda": load(work / "bench" / "bench_cuda.json"),
    "suite": next((load(p) for p in sorted((work / "suite").glob("*.json"))), None),
}
results.mkdir(parents=True, exist_ok=True)
(results / f"{gpu}.json").write_text(json.dumps(summary, indent=1) + "\n")

md = [f"# gpu_check on {gpu} (arch {arch or '-'})", ""]
md.append(f"- build: {'ok' if summary['build_ok'] else 'FAILED'}")
for key in ("gpu_tests", "test_suite"):
    s = summary[key]
    md.append(f"- {key}: exit {s['exit_status']}, passed {s.get('passed', '-')}, failed {s.get('failed', '-')}, "
              f"skipped {s.get('skipped', '-')}")
v = summary["verified"] or {}
md.append(f"- verified kernels: {', '.join(v.get('verified', [])) or '(none)'}")
if v.get("failed"):
    md.append(f"- kernels with FAILED tests: {', '.join(v['failed'])}")
if v.get("untested"):
    md.append(f"- kernels without passing tests here: {', '.join(v['untested'])}")
md.append("")
bench_md = work / "bench" / "bench_cuda.md"
if bench_md.exists():
    md += [bench_md.read_text(), ""]
suite_md = work / "suite" / "suite.md"
if suite_md.exists() and suite_md.stat().st_size:
    md += ["## benchmarks/suite.py --quick", "", suite_md.read_text(), ""]
(results / f"{gpu}.md").write_text("\n".join(md) + "\n")
for src, dst in ((work / "bench" / "bench_cuda.png", f"{gpu}.png"),):
    if src.exists():
        shutil.copy(src, results / dst)
pngs = sorted((work / "suite").glob("*.png"))
if pngs:
    shutil.copy(pngs[0], results / f"{gpu}-suite.png")
print("\n".join(md[:8]))
PYEOF

  if (( build_ok && gpu_tests_rc == 0 && rest_rc == 0 )); then
    return 0
  fi
  return 1
}

if ! gpu_present && [[ "${GPU_CHECK_ALLOW_NO_GPU:-0}" != 1 ]]; then
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi missing or failing). This script needs a GPU machine;" >&2
  echo "gpu_check: set GPU_CHECK_ALLOW_NO_GPU=1 to exercise it without one (nothing is verified then)." >&2
  exit 2
fi
mkdir -p "$WORK" "$RESULTS"
# Reports of an earlier run on this machine must not count (the build folders stay: incremental).
rm -rf "$WORK/bench" "$WORK/suite" "$WORK"/junit-*.xml "$WORK"/pytest-*.log "$WORK/gpu_name"
main 2>&1 | tee "$WORK/gpu_check.log"
status=${PIPESTATUS[0]}

gpu_name=$(cat "$WORK/gpu_name" 2>/dev/null || echo no-gpu)
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  cp "$WORK/gpu_check.log" "$OUT/" 2>/dev/null
  for f in "$gpu_name.json" "$gpu_name.md" "$gpu_name.png" "$gpu_name-suite.png" "$gpu_name-verified.json" \
           "$gpu_name-gptq.json"; do
    if [[ -f "$RESULTS/$f" ]]; then cp "$RESULTS/$f" "$OUT/"; fi
  done
  tar -czf "$OUT/gpu_check_raw.tar.gz" -C "$WORK" --exclude='build-*' . 2>/dev/null
  echo "copied results to $OUT: $(find "$OUT" -maxdepth 1 -type f -printf '%f ' 2>/dev/null)"
fi
echo "gpu_check: exit status $status after $(elapsed)s"
exit "$status"
