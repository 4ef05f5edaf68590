#!/usr/bin/env bash
# GPU throughput benchmark for an H100/H200 node: ViT-B-32 @ 224 and ViT-L-14 @ 336, bf16,
# ZeRO-2 and ZeRO-3, local loss with gather-with-grad, synthetic data.  For each run it reports
# samples/s/GPU (median of the logged steps after the first), MFU (model FLOPs per sample from
# torch's FlopCounterMode x samples/s/GPU / the GPU's dense bf16 peak) and peak GPU memory
# (nvidia-smi, sampled every 0.5 s).  Reference: open_clip's B/32 ran ~770 samples/s/GPU on A100-40GB.
#
#   bash benchmarks/gpu.sh                 # all GPUs of this node
#   DRY_RUN=1 bash benchmarks/gpu.sh       # print the commands only
#   DRY_RUN=cpu bash benchmarks/gpu.sh     # run a tiny CPU version end to end (tiny model, fp32, 1 rank)
#
# Knobs: NGPU, STEPS (default 60), PEAK_TFLOPS (default 989: H100/H200 SXM dense bf16), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=${DRY_RUN:-0}
STEPS=${STEPS:-60}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python}

if [[ "$DRY_RUN" == "cpu" ]]; then
  NGPU=1; STEPS=3; PEAK_TFLOPS=0.1; PREC=fp32; OUT=${OUT_DIR:-$(mktemp -d)}
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  CASES=("tiny tests/assets/tiny-clip.json 8 zero2 ")
else
  NGPU=${NGPU:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}; NGPU=$(( NGPU > 0 ? NGPU : 1 )); PREC=bf16
  # name model batch/GPU zero extra-flags
  CASES=("b32-224-z2 ViT-B-32 256 zero2 "
         "b32-224-z3 ViT-B-32 256 zero3 "
         "l14-336-z2 ViT-L-14-336 96 zero2 --grad-checkpointing"
         "l14-336-z3 ViT-L-14-336 96 zero3 --grad-checkpointing")
fi
[[ "$DRY_RUN" == "1" ]] || mkdir -p "$OUT"

for case in "${CASES[@]}"; do
  read -r name model batch zero extra <<<"$case"
  samples=$(( batch * NGPU * (STEPS + 1) ))
  cmd=($PY -m torch.distributed.run --nproc_per_node "$NGPU" --master_addr 127.0.0.1 --master_port $(( 29500 + RANDOM % 1000 ))
       dsclip/train.py --model "$model" --batch-size "$batch" --precision "$PREC" --ds_config "ds_configs/$zero.json"
       --dataset-type synthetic --train-num-samples "$samples" --epochs 1 --max-steps "$STEPS" --local-loss
       --gather-with-grad --log-every-n-steps 5 --val-frequency 0 --zeroshot-frequency 0 --no-baseline-eval
       --workers 4 --logs-dir "$OUT" --name "$name" $extra)
  [[ "$DRY_RUN" == "cpu" ]] && cmd+=(--workers 0 --threads 1 --log-every-n-steps 1)
  echo "+ ${cmd[*]}"
  if [[ "$DRY_RUN" == "1" ]]; then continue; fi
  rm -rf "${OUT:?}/$name"
  smi_pid=""
  if command -v nvidia-smi >/dev/null && [[ "$DRY_RUN" == "0" ]]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/$name.mem" & smi_pid=$!
  fi
  "${cmd[@]}" > "$OUT/$name.log" 2>&1 || { echo "$name failed; see $OUT/$name.log"; tail -20 "$OUT/$name.log"; }
  [[ -n "$smi_pid" ]] && kill "$smi_pid"
done

if [[ "$DRY_RUN" == "1" ]]; then echo "dry run: commands printed, nothing run"; exit 0; fi

# summary: samples/s/GPU, MFU, peak memory -> $OUT/gpu.json and gpu.md
$PY - "$OUT" "$PEAK_TFLOPS" "${CASES[@]}" <<'EOF'
import json, os, statistics, sys
sys.path.insert(0, "benchmarks")
from common import md_table, write_report
from efficiency import flops_per_sample

out, peak = sys.argv[1], float(sys.argv[2]) * 1e12
rows, fps_cache = [], {}
for case in sys.argv[3:]:
    name, model, batch, zero = case.split()[:4]
    path = os.path.join(out, name, "results.jsonl")
    recs = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
    sps = [r["samples_per_s_per_rank"] for r in recs if "samples_per_s_per_rank" in r][1:]
    rate = statistics.median(sps) if sps else float("nan")
    if model not in fps_cache:
        fps_cache[model] = flops_per_sample(model, batch=1)[0]
    mem = os.path.join(out, f"{name}.mem")
    peak_mib = max((int(x) for x in open(mem) if x.strip().isdigit()), default=None) if os.path.exists(mem) else None
    rows.append({"run": name, "model": model, "batch_per_gpu": int(batch), "zero": zero,
                 "samples_per_s_per_gpu": rate, "mfu": rate * fps_cache[model] / peak,
                 "peak_mem_gib": peak_mib / 1024 if peak_mib else None,
                 "gflop_per_sample": fps_cache[model] / 1e9})
cols = ["run", "model", "batch_per_gpu", "zero", "samples_per_s_per_gpu", "mfu", "peak_mem_gib", "gflop_per_sample"]
print(md_table(rows, cols))
write_report(out, "gpu", "GPU throughput (bf16, local loss)", {"peak_tflops": peak / 1e12}, {"rows": rows},
             [md_table(rows, cols), "Reference: ~770 samples/s/GPU for ViT-B-32 on A100-40GB (open_clip)."])
EOF
