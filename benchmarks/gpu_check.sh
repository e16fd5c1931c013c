#!/usr/bin/env bash
# One-shot GPU check for a session that has an NVIDIA GPU (prepared without one; GPU figures are not measured until
# this runs). Stages, each under its own time limit, in priority order:
#   1. sanity: one compiled forward/backward against the dense reference (fails fast on a broken stack)
#   2. kernel tests compiled on the GPU (tests/kernels without the interpreter; the CPU-path tests are skipped)
#   3. benchmarks/kernels.py --preset gpu-check   (DeiT-B qkv/proj/fc1/fc2, 64x197 tokens, bf16, blocks 32/64)
#   4. benchmarks/vit_e2e.py                      (DeiT-S/B dense vs pruned+exported, images/s, NVML J/image)
#   5. python -m lpl.prune.calibrate              (cost-model fit, predicted vs measured per layer)
# Results land in benchmarks/results/ (file names carry the device) and, when $OUT is set (device tool), are copied
# there too. Whole run: about 8 minutes on an H100 (mostly Triton autotuning); run with a 10-minute limit.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
RESULTS=benchmarks/results
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
copy_out() { if [ -n "${OUT:-}" ]; then cp "$RESULTS"/*"${SLUG}"* "$OUT"/ 2>/dev/null; cp "$LOG" "$OUT"/ 2>/dev/null; fi; }
trap copy_out EXIT

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device visible to torch: nothing to check (GPU figures stay unmeasured)"; exit 1
fi
# lpl.kernels is the top-level kernels/ folder (pyproject package-dir); install the checkout without dependencies.
python -c "import lpl.kernels" 2>/dev/null || pip install --quiet --no-deps --no-build-isolation -e . >>"$LOG" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv >>"$LOG" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'tf32', torch.backends.cuda.matmul.allow_tf32)" 2>&1 | tee -a "$LOG"

say "1. sanity"
timeout 120 python - <<'PY' 2>&1 | tee -a "$LOG" || { say "sanity failed: stopping"; exit 1; }
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

say "2. kernel tests (compiled)"
timeout 150 python -m pytest tests/kernels -q -x -p no:cacheprovider --ignore-glob="tests/kernels/test_cpu_*" \
  --deselect tests/kernels/test_calibrate.py::test_cpu_calibration_and_validation_run_on_the_real_kernel 2>&1 | tail -15 | tee -a "$LOG"

say "3. kernel benchmark"
timeout 240 python benchmarks/kernels.py --preset gpu-check 2>&1 | tee -a "$LOG" | grep -E "^\| deit|written|Error|error" | tail -45

say "4. ViT end to end"
if python -c "import timm" 2>/dev/null; then
  timeout 150 python benchmarks/vit_e2e.py --energy-s 4 --budget-s 3 2>&1 | tee -a "$LOG" | grep -E "^\| deit|written|Error" 
else
  say "timm is not installed here: end-to-end benchmark skipped"
fi

say "5. cost-model calibration"
timeout 150 python -m lpl.prune.calibrate --device cuda --out "$RESULTS" --repeats 5 2>&1 | tee -a "$LOG" | head -8
say "done"
