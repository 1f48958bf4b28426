#!/usr/bin/env bash
# GPU checks and benchmarks in one call of at most ~13 minutes (issues 5 and 13, "GPU"):
#   1. correctness on CUDA against the CPU, same weights (benchmarks/gpu_check.py): beam search
#      returns the same items, a few training steps give the same losses (fp32 and autocast);
#   2. beam search on the GPU (benchmarks/beam_search.py --device cuda);
#   3. training throughput on the GPU, sampler vs step, dense and sparse Adam
#      (benchmarks/training.py --device cuda; target: attention-DNN >= 20k samples/s);
#   4. step time at 100k vs 4M items (benchmarks/step_scaling.py --device cuda);
#   5. the corpus-scale pipeline with its training steps on the GPU (benchmarks/corpus_scale.py).
# JSON results and logs go to $OUT when it is set (the device tool), else benchmarks/results.
# Fails loudly (exit 2) where no Python with a CUDA torch that sees a GPU is found.
#
#   benchmarks/gpu.sh                  # on a CUDA machine (all steps)
#   ONLY=step_scaling,corpus_scale benchmarks/gpu.sh   # some steps (a tool with a 10-min cap)
#   benchmarks/gpu.sh --cpu-dry-run    # the same steps on the CPU at tiny sizes (tests the script)
#   PY=/path/to/python benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out_dir="${OUT:-benchmarks/results}"
mkdir -p "$out_dir"

device=cuda
if [[ "${1:-}" == "--cpu-dry-run" ]]; then
  device=cpu
  [[ -z "${OUT:-}" ]] && out_dir=$(mktemp -d /tmp/tdm-gpu-dry-run.XXXXXX)  # keep real results
fi

want="import torch, sys; sys.exit(not torch.cuda.is_available())"
[[ $device == cpu ]] && want="import torch"
candidates=("${PY:-}")
[[ -z "${PY:-}" ]] && candidates=(python3 .venv/bin/python)
PY=
for candidate in "${candidates[@]}"; do
  if command -v "$candidate" >/dev/null && "$candidate" -c "$want" 2>/dev/null; then
    PY=$candidate
    break
  fi
done
if [[ -z "$PY" ]]; then
  echo "gpu.sh: FAILED: no CUDA. torch.cuda.is_available() is False (or torch is missing)" \
    "for ${candidates[*]}." >&2
  echo "gpu.sh: run it on a CUDA machine, or try it on the CPU with --cpu-dry-run." >&2
  exit 2
fi
if [[ $device == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# step NAME SECONDS ARGS...: run one Python step under a time limit, log to $out_dir/NAME.log
step() {
  local name=$1 limit=$2
  shift 2
  if [[ -n "${ONLY:-}" && ",$ONLY," != *",$name,"* ]]; then
    echo "== $name skipped (ONLY=$ONLY)"
    return 0
  fi
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$PY" "$@" --device "$device" --out "$out_dir" 2>&1 | tee "$out_dir/$name.log"
}

start=$SECONDS
if [[ $device == cuda ]]; then
  step gpu_check 90 benchmarks/gpu_check.py --threads 8
  step beam_search 200 benchmarks/beam_search.py --leaves 10000,100000,1000000 --batch 2048 \
    --budget 1 --max-batches 4 --min-single 20 --max-single 100 --brute-budget 2 --max-brute 64
  step training 120 benchmarks/training.py --budget 3 --batch 256
  step training_big_batch 60 benchmarks/training.py --budget 3 --batch 4096 --no-profile \
    --no-train --out-name training_batch4096
  step training_sparse 90 benchmarks/training.py --budget 3 --batch 2048 --no-profile \
    --optimizer sparse_adam --out-name training_sparse_batch2048
  step step_scaling 120 benchmarks/step_scaling.py --items 100000,4000000 --reps 3
  step corpus_scale 420 benchmarks/corpus_scale.py --steps 2000 --batch 2048 --workdir /tmp/cs
else
  step gpu_check 600 benchmarks/gpu_check.py --leaves 2000 --users 64
  step beam_search 600 benchmarks/beam_search.py --leaves 2000 --models dnn --ks 10 --batch 64 \
    --budget 0.2 --max-batches 2 --min-single 3 --max-single 3 --brute-budget 0.2 --max-brute 2
  step training 600 benchmarks/training.py --users 1000 --items 2000 --models product_dnn \
    --budget 0.5 --no-train --optimizer sparse_adam
  step step_scaling 600 benchmarks/step_scaling.py --items 1000,4000 --models product_dnn \
    --reps 1 --steps 1 --batches 1
fi
echo "gpu.sh: all steps passed in $((SECONDS - start)) s; results in $out_dir"
