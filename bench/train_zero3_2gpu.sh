#!/usr/bin/env bash
# ZeRO-3 on 2 GPUs vs 1 GPU, and a 2-GPU checkpoint resumed on 1 GPU (bench/results/train_zero3_h200x2.md).
#   1. the tiny recipe (configs/tiny.yaml) with configs/ds_zero3.json on 2 GPUs, 128 documents per GPU;
#   2. beside each other on GPU 0 / GPU 1: the same run on 1 GPU with 2 accumulation steps (the same documents
#      per optimiser step; skipped with REFERENCE=0), and the 2-GPU checkpoint of step SAVE resumed on 1 GPU.
# Run from the repository root on a machine with 2 GPUs:  bash bench/train_zero3_2gpu.sh
# Results file, call 1: defaults; call 2: STEPS=60 LOG=1 EVAL=0 EVAL_DOCS=300 REFERENCE=0.
set -u
STEPS=${STEPS:-240}; SAVE=${SAVE:-$((STEPS / 2))}; LOG=${LOG:-10}; EVAL=${EVAL:-$SAVE}; EVAL_DOCS=${EVAL_DOCS:-600}
REFERENCE=${REFERENCE:-1}
OUT=${OUT:-runs/zero3_2gpu}; mkdir -p "$OUT"; export OUT
if [ -d .whl ]; then  # the project's device boxes: DeepSpeed from carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpus.txt
COMMON="--config configs/tiny.yaml --deepspeed configs/ds_zero3.json --train.max_steps $STEPS --train.save_every $SAVE \
 --train.eval_every $EVAL --data.eval_docs $EVAL_DOCS --train.generate_eval_docs 0 --train.log_every $LOG \
 --data.num_workers 6 --train.tensorboard false --train.micro_batch_size 128"
R="python -m deepspeed.launcher.runner"
TAG=$(printf "step%08d" "$SAVE")
timeout 300 $R --num_gpus 2 --master_port 29500 scripts/train.py $COMMON --train.output_dir $OUT/two.run \
  --train.grad_accum 1 > $OUT/two.log 2>&1; echo "two rc=$?"
mkdir -p $OUT/two_to_one.run && cp -r $OUT/two.run/checkpoints $OUT/two_to_one.run/
RUNS="two two_to_one"
if [ "$REFERENCE" = 1 ]; then
  RUNS="two one two_to_one"
  timeout 300 $R --include localhost:0 --master_port 29501 scripts/train.py $COMMON --train.output_dir $OUT/one.run \
    --train.grad_accum 2 > $OUT/one.log 2>&1 &
fi
timeout 300 $R --include localhost:1 --master_port 29502 scripts/train.py $COMMON --train.output_dir $OUT/two_to_one.run \
  --train.grad_accum 2 --train.resume $TAG > $OUT/two_to_one.log 2>&1; echo "two_to_one rc=$?"
wait
for r in $RUNS; do cp $OUT/$r.run/metrics.jsonl $OUT/$r.metrics.jsonl 2>/dev/null; done
RUNS=$RUNS python - <<'PY'
import json, os
out, runs = os.environ["OUT"], os.environ["RUNS"].split()
def rows(name):
    try:
        return [json.loads(line) for line in open(f"{out}/{name}.metrics.jsonl")]
    except OSError:
        return []
train = {name: {x["step"]: x["loss"] for x in rows(name) if x["kind"] == "train"} for name in runs}
for name in runs[1:]:
    common = sorted(set(train[name]) & set(train["two"]))
    worst = max((abs(train[name][s] - train["two"][s]) / train["two"][s] for s in common), default=float("nan"))
    print(f"{name} vs two: {len(common)} logged steps in common, max relative loss difference {worst:.2e}")
for name in runs:
    print(name, "train", [(s, round(v, 4)) for s, v in sorted(train[name].items())])
    print(name, "eval", [{k: v for k, v in x.items() if not isinstance(v, (list, dict))} for x in rows(name) if x["kind"] != "train"])
PY
grep -h "universal\|written by\|exported to\|Error" $OUT/*.log | head -20
