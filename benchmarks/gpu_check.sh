#!/usr/bin/env bash
# The checks that need a GPU, in one pass (CI has none; run this where CUDA is present):
# the Triton kernels and the optimizers on CUDA tensors (tests/kernels, tests/gpu), the
# CPU-tensor suites with CUDA present (tests/wan and tests/bench are not run), the
# kernels' throughput against the device's own copy (Triton beside the torch reference),
# and DeMo's step beside AdamW's on a GPT-2-small-sized model.
#
#   bash benchmarks/gpu_check.sh OUTDIR        # logs land in OUTDIR (default /tmp/lowband-gpu)
#
# DEV=cpu N=65536 runs the same steps on the CPU (to check the script itself).
set -u -o pipefail
out=${1:-/tmp/lowband-gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
dev=${DEV:-cuda}
n=${N:+--n $N}
demo_model=${DEMO_MODEL:-base:n_layer=12,n_head=12,n_embd=768,block_size=256}
export PYTHONUNBUFFERED=1
status=0
run() {  # name, seconds, command...: log to OUTDIR/name, remember a failure, go on
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== $name: exit $rc"; status=1; }
}
run env.txt 60 $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
run pytest_gpu.log 240 $py -m pytest -q -rP -p no:cacheprovider tests/kernels tests/gpu
# the CPU-tensor suites with CUDA present (pinned host buffers, CUDA RNG in checkpoints)
xdist=$($py -c "import xdist" 2>/dev/null && echo "-n 8")
run pytest_cuda_present.log 240 $py -m pytest -q -p no:cacheprovider $xdist tests/optim \
    tests/distro tests/compress tests/transport tests/sync tests/fuzz tests/reliability
run kernels_triton.txt 100 $py benchmarks/bench_kernels.py --device "$dev" --backend triton $n
# the torch reference beside Triton at a size the reference finishes in time
small=${N:-67108864}
run kernels_triton_64m.txt 60 $py benchmarks/bench_kernels.py --device "$dev" --backend triton --n "$small" --reps 3
run kernels_torch_64m.txt 90 $py benchmarks/bench_kernels.py --device "$dev" --backend torch --n "$small" --reps 3
run demo_step.txt 100 $py benchmarks/bench_demo_step.py --device "$dev" --model "$demo_model" --batch 16 --rounds 20
exit $status
