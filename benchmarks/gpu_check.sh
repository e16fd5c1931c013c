#!/usr/bin/env bash
# One-shot GPU check on a machine with an NVIDIA GPU. Stages, in priority order, each under its own time limit
# and all under one deadline (GPU_CHECK_SECONDS, default 560 s from the start), so that the run ends inside a
# fixed time slot with whatever it measured:
#   1. sanity: one compiled forward/backward against the dense reference (fails fast on a broken stack)
#   2. benchmarks/order_device_check.py           (order science end to end on the GPU: record, sensitivities,
#                                                  retrain, every method scored, estimator on GPU vs CPU), and
#                                                  tests/order/test_on_gpu.py (GPU results against the CPU's)
#   3. benchmarks/linearized_replay_speed.py      (order estimation's full-space replay at the demo LM's size; with
#                                                  gensim there, beside retraining the demo LM on the GPU)
#   4. kernel tests compiled on the GPU (tests/kernels without the interpreter; the CPU-path tests are skipped)
#   5. benchmarks/kernels.py --preset gpu-check   (DeiT-B qkv/proj/fc1/fc2, 64x197 tokens, bf16, blocks 32/64)
#   6. benchmarks/vit_e2e.py                      (DeiT-S/B dense vs pruned+exported, images/s, NVML J/image)
#   7. benchmarks/prune_time.py                   (prune_model wall time, DeiT-S 16x16 and DeiT-B 32x32)
#   8. python -m lpl.prune.calibrate              (cost-model fit, predicted vs measured per layer)
# The order stages come first: the kernel stages' figures are on record from earlier runs (their code unchanged).
# Results land in benchmarks/results/ (file names carry the device); when $OUT is set (device tool) they are also
# packed into $OUT/gpu_results.tar beside the log. Without a GPU it says so and writes nothing (exit 1).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ! command -v python >/dev/null; then  # images that only have python3
  mkdir -p /tmp/lpl-shim && ln -sf "$(command -v python3)" /tmp/lpl-shim/python && export PATH="/tmp/lpl-shim:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
RESULTS=benchmarks/results
# no GPU: say so and write nothing (no log, no result files)
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA device visible to torch: nothing to check, nothing written (run it on a machine with" \
    "an NVIDIA GPU; the CPU benchmarks are the other scripts in benchmarks/, e.g. python benchmarks/kernels.py --quick)" >&2
  exit 1
fi
mkdir -p "$RESULTS"
SLUG=$(python - <<'PY'
import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no-gpu"
print("-".join(p for p in "".join(c if c.isalnum() else "-" for c in name.lower()).split("-") if p))
PY
)
LOG="$RESULTS/gpu_check_${SLUG}.log"
: > "$LOG"
say() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
copy_out() {
  if [ -n "${OUT:-}" ]; then
    tar -cf "$OUT/gpu_results.tar" "$RESULTS"/*"${SLUG}"* 2>/dev/null
    cp "$LOG" "$OUT"/ 2>/dev/null
  fi
}
trap copy_out EXIT
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-560} ))
# limit STAGE_SECONDS: the stage's own limit, cut to what is left before the deadline
# (at least 1: GNU timeout reads 0 as "no limit")
limit() { local left=$(( DEADLINE - $(date +%s) - 5 )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }

# lpl.kernels is the top-level kernels/ folder (pyproject package-dir); install the checkout without dependencies.
python -c "import lpl.kernels" 2>/dev/null || python -m pip install --quiet --no-deps --no-build-isolation -e . >>"$LOG" 2>&1
python -c "import lpl.kernels" 2>/dev/null || ln -s ../kernels lpl/kernels  # no pip there: link the package in place
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv >>"$LOG" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'tf32', torch.backends.cuda.matmul.allow_tf32)" 2>&1 | tee -a "$LOG"

say "1. sanity"
timeout "$(limit 90)" python - <<'PY' 2>&1 | tee -a "$LOG" || { say "sanity failed: stopping"; exit 1; }
import torch
from lpl.kernels import BlockSparseWeight, block_sparse_linear
torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    w = torch.randn(3072, 768, device="cuda")
    mask = torch.rand(48, 12, device="cuda") < 0.5
    sparse = BlockSparseWeight.from_dense(w, mask, 64).to(dtype=dtype)
    sparse.values.requires_grad_(True)
    x = torch.randn(4 * 197, 768, device="cuda", dtype=dtype, requires_grad=True)
    y = block_sparse_linear(x, sparse)
    dense = sparse.to_dense().detach().double()
    ref = x.double() @ dense.T
    y.backward(torch.ones_like(y))
    err = ((y.double() - ref).norm() / ref.norm()).item()
    dx_ref = torch.ones_like(ref) @ dense
    dx_err = ((x.grad.double() - dx_ref).norm() / dx_ref.norm()).item()
    print(f"sanity {dtype}: forward rel err {err:.2e}, dX rel err {dx_err:.2e}")
    assert err < 2e-2 and dx_err < 2e-2
PY

say "2. order science on the GPU"
timeout "$(limit 150)" python benchmarks/order_device_check.py --accelerator gpu 2>&1 | grep -v -i -E "warn|val_dataloader|treespec" \
  | tee -a "$LOG" | tee "$RESULTS/order_device_check_${SLUG}.txt"
timeout "$(limit 90)" python -m pytest tests/order/test_on_gpu.py -q -p no:cacheprovider 2>&1 | tail -3 | tee -a "$LOG"

say "3. linearised order replay speed"
# with the demo LM's corpus (gensim) at hand, retrain the demo LM on the GPU too: the speed-up side by side
RETRAIN=$(python -c "import importlib.util as u, sys; sys.exit(u.find_spec('gensim') is None)" 2>/dev/null && echo --retrain-demo-lm)
timeout "$(limit 150)" python benchmarks/linearized_replay_speed.py --device cuda --orders 1024 --chunks 20,22,24,26 \
  --paths fused,eager $RETRAIN 2>&1 | tee -a "$LOG" | tee "$RESULTS/linearized_replay_speed_${SLUG}.txt"

say "4. kernel tests (compiled)"
timeout "$(limit 100)" python -m pytest tests/kernels tests/prune/test_export.py tests/prune/test_calibrate.py \
  tests/test_telemetry.py -q -x -p no:cacheprovider --ignore-glob="tests/kernels/test_cpu_*" \
  --deselect tests/prune/test_calibrate.py::test_cpu_calibration_and_validation_run_on_the_real_kernel 2>&1 | tail -15 | tee -a "$LOG"

say "5. kernel benchmark"
timeout "$(limit 200)" python benchmarks/kernels.py --preset gpu-check 2>&1 | tee -a "$LOG" | grep -E "^\| deit|written|Error|error" | tail -45

say "6. ViT end to end"
timeout "$(limit 120)" python benchmarks/vit_e2e.py --energy-s 4 --budget-s 3 2>&1 | tee -a "$LOG" | grep -E "^\| deit|written|Error"

say "7. prune time"
timeout "$(limit 120)" python benchmarks/prune_time.py --models deit_s deit_b --device cuda --repeats 2 2>&1 | tee -a "$LOG" | tail -4

say "8. cost-model calibration"
timeout "$(limit 120)" python -m lpl.prune.calibrate --device cuda --out "$RESULTS" --repeats 5 2>&1 | tee -a "$LOG" | head -8
say "done"
