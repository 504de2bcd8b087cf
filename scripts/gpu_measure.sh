#!/usr/bin/env bash
# One GPU session's measurements: `python -m ditsweep.bench --gpu` on one Hopper GPU, with NATTEN's
# CUDA library built meanwhile, each call at most ~9 minutes. Two calls cover the fused-training
# issue (15 device minutes in all):
#
#   PART=fused (default)  fused k = 1/2/4/8 trial-steps/s of DiT-XS/1 global (while NATTEN builds)
#                         and local (NATTEN), bf16+compile and tf32; FID sampling per 1000 images
#                         through the evaluators' path (tf32, then bf16 + compile; alone and 4
#                         fused members at once); the calibration file with the fused rows
#   PART=drift            bf16 vs tf32 drift against the seed-to-seed spread (tf32 seeds 0 and 1,
#                         bf16+compile seed 0, DiT-XS/1 global, N=100, DRIFT_STEPS steps, the three
#                         at once); no NATTEN build. Prints the verdict line.
#   PART=calibration      the earlier per-trial calibration (precisions, compile, packing, flex)
#
# Prepare (on the workstation, once):   mkdir -p .gpu && cp -r ../shared/gpu/. .gpu/
#                                        echo /.gpu/ >> .git/info/exclude
# Run (device tool, carry [".gpu"], timeout_s 600):   BUDGET=540 bash scripts/gpu_measure.sh
#                                                     PART=drift BUDGET=540 bash scripts/gpu_measure.sh
#
# Writes to $OUT (at most 8 files come back): bench_gpu.jsonl (every measurement, one JSON line),
# <gpu-slug>.json (the calibration file; merge its rows into ditsweep/bench/calibration/),
# gpu_measure.log, natten_build.log. Items are run in priority order, each under `timeout`, and
# skipped when the budget runs out; the calibration file is always written from what was measured.
# Knobs: PART, BUDGET (s, 540), DRIFT_STEPS (1500: 3 trainings at once must fit BUDGET; tf32 alone
# ran 6.7 steps/s on an H200), EVAL (1; 0 skips the evaluation costs), BUILD (trim|none),
# BUILD_DEADLINE (s after start, 330), WORKERS (12: leaves 4 cores to the bench), KIT (.gpu),
# PY (python3), WORK (/tmp/ditsweep-gpu-measure), SMOKE=1 (a CPU dry run of this script: tiny
# models, no compile, no NATTEN build; both parts in one call).
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
PART=${PART:-fused}; DRIFT_STEPS=${DRIFT_STEPS:-1500}; ON=on; FUSE_KS=1,2,4,8
SMOKE_ARGS=""
if [ -n "${SMOKE:-}" ]; then  # tiny sizes; compile off (Inductor on a CPU takes minutes)
  SMOKE_ARGS="--smoke --iters 1 --warmup 0 --pack-seconds 2"; BUILD=none; ON=off; DRIFT_STEPS=10; FUSE_KS=1,2
  [ "$PART" = fused ] && PART=fused,drift
fi
case "$PART" in *drift*) [[ "$PART" != *fused* ]] && BUILD=none ;; esac
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

if [[ "$PART" == *fused* ]]; then
# ---- fused k, global first (no libnatten needed), then sampling, then local once NATTEN is built
bench "$NATTEN_PY" --phases peak,fused --fused "global:bf16:$ON" --fuse-ks $FUSE_KS
bench "$NATTEN_PY" --phases fused --fused global:tf32:off --fuse-ks $FUSE_KS
[ "${EVAL:-1}" = 1 ] && bench "$NATTEN_PY" --phases sampling --eval-precision tf32 --eval-compile off --sample-members 4
[ "${EVAL:-1}" = 1 ] && bench "$NATTEN_PY" --phases sampling,eval --eval-precision bf16 --eval-compile $ON --sample-members 4
fi
if [[ "$PART" == *drift* ]]; then
bench "$NATTEN_PY" --phases drift --drift-steps $DRIFT_STEPS --drift-compile $ON \
  $([ -n "${SMOKE:-}" ] && echo "--drift-window 5 --drift-n 10 --drift-gap-steps 5")
fi
if [ "$PART" = calibration ]; then
# ---- A: what needs no libnatten, while it builds (global layouts, UNet, evaluation costs)
bench "$NATTEN_PY" --phases peak,syncs,global --precisions tf32,bf16 --compile off
[ "${EVAL:-1}" = 1 ] && bench "$NATTEN_PY" --phases eval --eval-precision tf32
bench "$NATTEN_PY" --phases unet --precisions tf32 --compile off
A_LATER=("--phases global --precisions bf16 --compile on" "--phases global --precisions fp32 --compile off"
         "--phases global --precisions tf32 --compile on" "--phases unet --precisions bf16 --compile off")
while building && [ ${#A_LATER[@]} -gt 0 ]; do bench "$NATTEN_PY" ${A_LATER[0]}; A_LATER=("${A_LATER[@]:1}"); done
fi

if [ -n "$BUILD_PID" ]; then
  step "waiting for libnatten (deadline ${BUILD_DEADLINE}s)"
  while building && [ $(( $(date +%s) - T0 )) -lt "$BUILD_DEADLINE" ]; do sleep 3; done
  building && { echo "build still running: stopped"; kill -TERM -- "-$BUILD_PID" 2>/dev/null; sleep 2; kill -KILL -- "-$BUILD_PID" 2>/dev/null; }
  tail -n 5 "$OUT/natten_build.log"
  ls "$SRC"/src/natten/libnatten*.so >/dev/null 2>&1 && NATTEN_LIB="$SRC/src"
fi
NATTEN_B=${NATTEN_LIB:-$NATTEN_PY}
PYTHONPATH="$NATTEN_B" "$PY" -c "import natten; print('natten', natten.__version__, 'HAS_LIBNATTEN', natten.HAS_LIBNATTEN)" 2>&1 | tail -1

if [[ "$PART" == *fused* ]]; then
bench "$NATTEN_B" --phases fused --fused "local:bf16:$ON" --fuse-ks $FUSE_KS
bench "$NATTEN_B" --phases fused --fused local:tf32:off --fuse-ks $FUSE_KS
fi
if [ "$PART" = calibration ]; then
# ---- B: local layouts (NATTEN's fused kernels if built), packing, then what is left of A
bench "$NATTEN_B" --phases syncs,local --precisions tf32,bf16 --compile off
bench "$NATTEN_B" --phases local --precisions bf16 --compile on
bench "$NATTEN_B" --phases pack --pack local:bf16:on --trials-per-gpu 2,4 --pack-seconds 10
bench "$NATTEN_B" --phases pack --pack local:tf32:off --trials-per-gpu 2,4 --pack-seconds 10
for item in "${A_LATER[@]}"; do bench "$NATTEN_PY" $item; done
bench "$NATTEN_B" --phases local --precisions fp32 --compile off
bench "$NATTEN_B" --phases local --precisions tf32 --compile on
bench "$NATTEN_PY" --phases flex --precisions bf16,tf32
fi

step "calibration file"
cp "$WORK/bench/bench_gpu.jsonl" "$OUT/" 2>/dev/null
PYTHONPATH="$ROOT:$WORK/site" "$PY" -m ditsweep.bench.gpu write "$WORK/bench" && cp "$WORK"/bench/*.json "$OUT/"
PYTHONPATH="$ROOT:$WORK/site" "$PY" - "$OUT/bench_gpu.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["kind"] in ("train", "pack", "fused"):
        v = r.get("steps_per_second")
        print(f"{r['kind']:5} {r.get('model',''):9} {r.get('layout_name',''):7} {r.get('precision',''):5} "
              f"compile={int(bool(r.get('compile')))} x{r.get('trials_per_gpu', 1)} k={r.get('fuse', 1)} "
              + (f"{v:7.2f} steps/s/trial  total {r.get('trial_steps_per_second', r.get('total_steps_per_second', v)):7.2f}  "
                 f"first {r.get('first_step_s') or 0:.1f}s  mem {r.get('peak_mem_gib') or 0:.1f}GiB  "
                 f"peak% {100 * (r.get('fraction_of_bf16_peak') or 0):.1f}  attn {r.get('attention')}"
                 if v else r.get("error", "")))
    elif r["kind"] == "drift_verdict" and "line" in r:
        print(r["line"])
    elif r["kind"] in ("eval", "syncs", "peak", "env", "drift"):
        print({k: v for k, v in r.items() if k != "loss_windows"})
PYEOF
echo "total wall: $(( $(date +%s) - T0 ))s"
