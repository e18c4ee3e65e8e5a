#!/usr/bin/env bash
# The benchmarks that need a GPU, as one run on a lent GPU machine (python3 there has torch; the other
# packages come as wheels in .whl/, see the README's Benchmarks section). Results go to $OUT.
#
#   bash scripts/bench/gpu_suite.sh perf   # PathoCLIP ViT-B-16 bf16 under torchrun (images/s, GPU busy),
#                                          # clip train vs bare open_clip, MIL epoch vs its floor (bf16)
#   bash scripts/bench/gpu_suite.sh w2s    # bench_w2s --setting hard-synth: 3 seeds x 4 models in parallel
#   bash scripts/bench/gpu_suite.sh vlm    # a Qwen2.5-VL-3B-shaped bf16 + LoRA GRPO run: peak memory,
#                                          # generation tokens/s, step time (needs trl and datasets there)
set -uo pipefail
what=${1:-perf}
OUT=${OUT:-/tmp/gpu_suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PATHMIL_CACHE=${PATHMIL_CACHE:-$PWD/.cache} PYTHONPATH=${PYTHONPATH:-}:$PWD
py=${PY:-python3}
b=scripts/bench
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

if [ "$what" = perf ]; then
  timeout 200 $py $b/bench_clip.py gpu --model ViT-B-16 --images 6144 --epochs 3 --batch-size 256 --workers 12 \
    --json "$OUT/clip_gpu.json" 2>&1 | tail -4
  timeout 120 $py $b/bench_clip.py step --model ViT-B-16 --batch-size 128 --steps 25 --device cuda \
    --json "$OUT/clip_step_gpu.json" 2>&1 | tail -2
  timeout 150 $py $b/bench_mil_speed.py --device cuda --bags 48 --repeats 2 2>&1 | tee "$OUT/mil_gpu.txt" | tail -6
  exit 0
fi

if [ "$what" = vlm ]; then
  $py -c "import trl, datasets" 2>/dev/null || { echo "vlm: trl / datasets are not installed on this machine"; exit 3; }
  timeout 500 $py $b/bench_vlm.py gpu --shape 3b --lora 16,32 --steps 4 --max-new 256 --json "$OUT/vlm_gpu.json" 2>&1 \
    | grep -v "Warning\|warn" | tail -8
  exit 0
fi

# w2s: build the three cohorts in parallel (CPU: synthesis and tiling; GPU: embedding), then one process
# per (seed, model) on the GPU, one torch thread each; then one table over every file.
work=/tmp/w2s; mkdir -p "$OUT/w2s"
for s in 0 1 2; do
  $py $b/bench_w2s.py --setting hard-synth --seeds $s --build-only --workers 5 --cache $work ${W2S_ARGS:-} \
    > "$OUT/w2s/build_$s.log" 2>&1 &
done
wait
tail -n 2 "$OUT"/w2s/build_*.log
left=$(( ${BUDGET_S:-560} - SECONDS ))   # what is left of the call for training; a run past it is left out
echo "cohorts built after ${SECONDS} s; ${left} s for training"
for s in 0 1 2; do
  for m in abmil clam-sb dsmil transmil; do
    timeout $left $py $b/bench_w2s.py --setting hard-synth --seeds $s --models $m --device ${W2S_DEVICE:-cuda} ${W2S_ARGS:-} \
      --threads 1 --cache $work --json "$OUT/w2s/hard_${s}_$m.json" > "$OUT/w2s/run_${s}_$m.log" 2>&1 &
  done
done
wait
grep -h "w2s=" "$OUT"/w2s/run_*.log
$py $b/bench_w2s.py --merge "$OUT"/w2s/hard_*.json 2>&1 | grep -v Warning | tee "$OUT/w2s_hard_table.txt"
tar -C "$OUT" -czf "$OUT/w2s_files.tgz" w2s && rm -rf "$OUT/w2s"
