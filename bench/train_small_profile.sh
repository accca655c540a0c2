#!/bin/bash
# `small` preset on one GPU: throughput, MFU and a torch.profiler breakdown for a few variants
# (bench/results/train_small_h100.md). Each variant is a separate `deepspeed --num_gpus 1 scripts/train.py`
# run of STEPS steps: log windows of 4 steps (the first two are warm-up: Triton compile and autotune,
# DataLoader start), steps PROFILE profiled (train.profile_steps -> profile.txt).
#   bash bench/train_small_profile.sh [variant ...]      # default: every variant below; $OUT gets the logs
# Needs deepspeed importable (see notes: pip install --target /tmp/site .whl/*.whl on the GPU box).
set -o pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/train_small_profile}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
STEPS=${STEPS:-20}
PROFILE=${PROFILE:-[18,19]}
TIME_LIMIT=${TIME_LIMIT:-420}  # seconds: start no new variant after this
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/summary.txt"
python3 -c "import deepspeed,torch,triton;print('deepspeed',deepspeed.__version__,'torch',torch.__version__,'triton',triton.__version__)" 2>&1 | tail -1 | tee -a "$OUT/summary.txt"
date -u | tee -a "$OUT/summary.txt"

# DeepSpeed JSON variants (written here, not kept in configs/ until one wins).
python3 - <<'EOF'
import json
base = json.load(open("configs/ds_zero2.json"))
z = dict(base["zero_optimization"])
one_gpu = dict(z, overlap_comm=False, reduce_bucket_size=500_000_000, allgather_bucket_size=500_000_000)
json.dump(dict(base, zero_optimization=one_gpu), open("/tmp/ds_zero2_big_buckets.json", "w"))
json.dump(dict(base, zero_optimization={"stage": 1}), open("/tmp/ds_zero1.json", "w"))
json.dump(dict(base, zero_optimization={"stage": 0}), open("/tmp/ds_zero0.json", "w"))
EOF

run() {  # $1 = name, $2 = DeepSpeed JSON, rest = extra flags (env via VAR=... before the call)
  local name=$1 ds=$2; shift 2
  local left=$(( TIME_LIMIT - $(date +%s) + T0 ))
  if [ $left -le 0 ]; then echo "== $name skipped (time limit)" | tee -a "$OUT/summary.txt"; return; fi
  local t=$(date +%s)
  echo "== $name: ds=$ds $* (SCOUT_MM_KERNELS=${SCOUT_MM_KERNELS:-auto})" | tee -a "$OUT/summary.txt"
  timeout $(( left + 120 )) deepspeed --num_gpus 1 scripts/train.py --config ${CONFIG:-configs/small.yaml} --deepspeed "$ds" \
    --train.output_dir /tmp/run_$name --train.max_steps $STEPS --train.log_every 4 \
    --train.profile_steps "$PROFILE" --train.tensorboard false $EXTRA "$@" 2>&1 \
    | grep -v "^\[20.*\] \[INFO\]\|FutureWarning\|return func\|warnings.warn" > "$OUT/log_$name.txt"
  local rc=$?
  grep "^step \|Error\|error\|Traceback" "$OUT/log_$name.txt" | tail -8 | tee -a "$OUT/summary.txt"
  echo "   rc=$rc, $(( $(date +%s) - t )) s" | tee -a "$OUT/summary.txt"
  [ -f /tmp/run_$name/profile.txt ] && { echo "== $name"; cat /tmp/run_$name/profile.txt; } >> "$OUT/profiles.txt"
}

VARIANTS=${*:-"base mb256 mb256_buckets mb256_zero1 mb256_reference"}
for v in $VARIANTS; do
  case $v in
    base) run base configs/ds_zero2.json ;;
    mb256) run mb256 configs/ds_zero2.json --train.micro_batch_size 256 ;;
    mb256_ga2) run mb256_ga2 configs/ds_zero2.json --train.micro_batch_size 256 --train.grad_accum 2 ;;
    mb256_buckets) run mb256_buckets /tmp/ds_zero2_big_buckets.json --train.micro_batch_size 256 ;;
    mb256_zero1) run mb256_zero1 /tmp/ds_zero1.json --train.micro_batch_size 256 ;;
    mb256_zero0) run mb256_zero0 /tmp/ds_zero0.json --train.micro_batch_size 256 ;;
    mb256_reference) SCOUT_MM_KERNELS=reference run mb256_reference configs/ds_zero2.json --train.micro_batch_size 256 ;;
    *) echo "unknown variant $v" ;;
  esac
done
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw --format=csv,noheader | tee -a "$OUT/summary.txt"
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$OUT/summary.txt"
