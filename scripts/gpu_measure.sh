#!/usr/bin/env bash
# One GPU session's measurement for issue 10: `python -m ditsweep.bench --gpu` on one Hopper GPU,
# with NATTEN's CUDA library built meanwhile, in one command of at most ~9 minutes.
#
# Prepare (on the workstation, once):   mkdir -p .gpu && cp -r ../shared/gpu/. .gpu/
#                                        echo /.gpu/ >> .git/info/exclude
# Run (device tool, carry [".gpu"], timeout_s 600):   BUDGET=540 bash scripts/gpu_measure.sh
#
# Writes to $OUT (at most 8 files come back): bench_gpu.jsonl (every measurement, one JSON line),
# <gpu-slug>.json (the calibration file; copy it to ditsweep/bench/calibration/), gpu_measure.log,
# natten_build.log. Items are run in priority order and skipped when the budget runs out; the
# calibration file is always written from what was measured.
#
# bf16-vs-tf32 drift does not fit this command; a second call (about 530 s) measures it:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && \
#   PYTHONPATH=.:/tmp/site python3 -m ditsweep.bench --gpu --phases drift --drift-steps 2000 --out $OUT
# Knobs: BUDGET (s, 540), EVAL (1; 0 skips the evaluation costs), BUILD (trim|none),
# BUILD_DEADLINE (s after start, 330), WORKERS (12:
# leaves 4 cores to the bench), KIT (.gpu), PY (python3), WORK (/tmp/ditsweep-gpu-measure), SMOKE=1
# (a CPU dry run of this script: tiny models, no NATTEN build).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KIT=${KIT:-$ROOT/.gpu}
OUT=${OUT:-$ROOT/gpu-out}; mkdir -p "$OUT"
WORK=${WORK:-/tmp/ditsweep-gpu-measure}; mkdir -p "$WORK"
PY=${PY:-python3}
BUDGET=${BUDGET:-540}; BUILD=${BUILD:-trim}; BUILD_DEADLINE=${BUILD_DEADLINE:-330}
T0=$(date +%s)
exec > >(tee -a "$OUT/gpu_measure.log") 2>&1
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
step() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore DITSWEEP_COMPILE_CACHE="$WORK/compile-cache"
SMOKE_ARGS=""; [ -n "${SMOKE:-}" ] && SMOKE_ARGS="--smoke --iters 2 --warmup 1 --pack-seconds 2" && BUILD=none
# bench NATTEN_PATH ARGS...: one guarded `bench --gpu` call; every result is appended to the jsonl
bench() {
  local npath=$1; shift
  local l; l=$(left)
  if [ "$l" -lt 45 ]; then echo "skip (${l}s left): $*"; return; fi
  step "bench --gpu $* (natten: ${npath:-none}, ${l}s left)"
  PYTHONPATH="$ROOT:$npath:$WORK/site" timeout -k 5 $(( l - 20 )) "$PY" -m ditsweep.bench --gpu \
    --out "$WORK/bench" --budget $(( l - 30 )) $SMOKE_ARGS "$@" 2>&1 \
    | grep -v -E "Warning|warnings.warn|^\s*$|torch._dynamo.utils.warn_once|This call originates"
}
building() { [ -n "${BUILD_PID:-}" ] && kill -0 "$BUILD_PID" 2>/dev/null; }

step "machine"
timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "no nvidia-smi"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
rm -rf "$WORK/bench" "$WORK/site"
ls "$KIT"/whl/*.whl >/dev/null 2>&1 && timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --target "$WORK/site" "$KIT"/whl/*.whl && echo "wheels installed (pydantic, webdataset, boto3)"

step "NATTEN"
SDIST=$(ls "$KIT"/whl/natten-0.21.7*.tar.gz 2>/dev/null | head -1)
NATTEN_PY=""; NATTEN_LIB=""; BUILD_PID=""
if [ -n "$SDIST" ]; then   # pure-Python NATTEN first (no libnatten: the Trainer falls back, and says so)
  rm -rf "$WORK/natten-py"; mkdir -p "$WORK/natten-py"; tar xzf "$SDIST" -C "$WORK/natten-py"
  NATTEN_PY=$(ls -d "$WORK"/natten-py/natten-*/src)
fi
if [ "$BUILD" != none ] && [ -n "$SDIST" ]; then  # the kit's trimmed build, in its own process group
  rm -rf "$WORK/natten-build" "$WORK/natten-cmake"; mkdir -p "$WORK/natten-build" "$WORK/natten-cmake" "$WORK/shim"
  tar xzf "$SDIST" -C "$WORK/natten-build"; SRC=$(ls -d "$WORK"/natten-build/natten-*)
  "$PY" "$KIT/trim_natten.py" "$SRC" --dtypes float32,bfloat16
  ln -sf "$(command -v "$PY")" "$WORK/shim/python"
  command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
  env PATH="$WORK/shim:$PATH" NATTEN_CUDA_ARCH=9.0 NATTEN_N_WORKERS=${WORKERS:-12} NATTEN_BUILD_DIR="$WORK/natten-cmake" \
      CMAKE_GENERATOR=$(command -v ninja >/dev/null && echo Ninja) \
      setsid bash -c 'cd "$1" && nice -n 10 "$2" setup.py build_ext --inplace' _ "$SRC" "$PY" \
      > "$OUT/natten_build.log" 2>&1 &
  BUILD_PID=$!
  echo "building libnatten (pid $BUILD_PID, log natten_build.log)"
fi

# ---- A: what needs no libnatten, while it builds (global layouts, UNet, evaluation costs)
bench "$NATTEN_PY" --phases peak,syncs,global --precisions tf32,bf16 --compile off
[ "${EVAL:-1}" = 1 ] && bench "$NATTEN_PY" --phases eval --eval-precision tf32
bench "$NATTEN_PY" --phases unet --precisions tf32 --compile off
A_LATER=("--phases global --precisions bf16 --compile on" "--phases global --precisions fp32 --compile off"
         "--phases global --precisions tf32 --compile on" "--phases unet --precisions bf16 --compile off")
while building && [ ${#A_LATER[@]} -gt 0 ]; do bench "$NATTEN_PY" ${A_LATER[0]}; A_LATER=("${A_LATER[@]:1}"); done

if [ -n "$BUILD_PID" ]; then
  step "waiting for libnatten (deadline ${BUILD_DEADLINE}s)"
  while building && [ $(( $(date +%s) - T0 )) -lt "$BUILD_DEADLINE" ]; do sleep 3; done
  building && { echo "build still running: stopped"; kill -TERM -- "-$BUILD_PID" 2>/dev/null; sleep 2; kill -KILL -- "-$BUILD_PID" 2>/dev/null; }
  tail -n 5 "$OUT/natten_build.log"
  ls "$SRC"/src/natten/libnatten*.so >/dev/null 2>&1 && NATTEN_LIB="$SRC/src"
fi
NATTEN_B=${NATTEN_LIB:-$NATTEN_PY}
PYTHONPATH="$NATTEN_B" "$PY" -c "import natten; print('natten', natten.__version__, 'HAS_LIBNATTEN', natten.HAS_LIBNATTEN)" 2>&1 | tail -1

# ---- B: local layouts (NATTEN's fused kernels if built), packing, then what is left of A
bench "$NATTEN_B" --phases syncs,local --precisions tf32,bf16 --compile off
bench "$NATTEN_B" --phases local --precisions bf16 --compile on
bench "$NATTEN_B" --phases pack --pack local:bf16:on --trials-per-gpu 2,4 --pack-seconds 10
bench "$NATTEN_B" --phases pack --pack local:tf32:off --trials-per-gpu 2,4 --pack-seconds 10
for item in "${A_LATER[@]}"; do bench "$NATTEN_PY" $item; done
bench "$NATTEN_B" --phases local --precisions fp32 --compile off
bench "$NATTEN_B" --phases local --precisions tf32 --compile on
bench "$NATTEN_PY" --phases flex --precisions bf16,tf32

step "calibration file"
cp "$WORK/bench/bench_gpu.jsonl" "$OUT/" 2>/dev/null
PYTHONPATH="$ROOT:$WORK/site" "$PY" -m ditsweep.bench.gpu write "$WORK/bench" && cp "$WORK"/bench/*.json "$OUT/"
PYTHONPATH="$ROOT:$WORK/site" "$PY" - "$OUT/bench_gpu.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["kind"] in ("train", "pack"):
        v = r.get("steps_per_second")
        print(f"{r['kind']:5} {r.get('model',''):9} {r.get('layout_name',''):7} {r.get('precision',''):5} "
              f"compile={int(bool(r.get('compile')))} x{r.get('trials_per_gpu', 1)} {r.get('backend', 'auto'):5} "
              + (f"{v:7.2f} steps/s/trial  total {r.get('total_steps_per_second', v):7.2f}  "
                 f"first {r.get('first_step_s') or 0:.1f}s  mem {r.get('peak_mem_gib') or 0:.1f}GiB  "
                 f"peak% {100 * (r.get('fraction_of_bf16_peak') or 0):.1f}  attn {r.get('attention')}"
                 if v else r.get("error", "")))
    elif r["kind"] in ("eval", "syncs", "peak", "env"):
        print(r)
PYEOF
echo "total wall: $(( $(date +%s) - T0 ))s"
