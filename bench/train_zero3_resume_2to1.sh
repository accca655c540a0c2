#!/usr/bin/env bash
# 2-GPU ZeRO-3 run (60 steps, checkpoint at 30), then its step-30 checkpoint resumed on 1 GPU for steps 31-60.
# Run from the repository root on a machine with 2 GPUs: bash bench/train_zero3_resume_2to1.sh  (OUT=dir for logs).
OUT=${OUT:-runs/zero3_2to1}; mkdir -p "$OUT"; export OUT
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
COMMON="--config configs/tiny.yaml --deepspeed configs/ds_zero3.json --train.max_steps 60 --train.save_every 30 \
 --train.eval_every 0 --data.eval_docs 300 --train.generate_eval_docs 0 --train.log_every 1 --data.num_workers 6 \
 --train.tensorboard false --train.micro_batch_size 128"
R="python -m deepspeed.launcher.runner"
date -u
timeout 150 $R --num_gpus 2 --master_port 29500 scripts/train.py $COMMON --train.output_dir $OUT/two.run \
  --train.grad_accum 1 > $OUT/two.log 2>&1; echo "two rc=$?"; date -u
mkdir -p $OUT/two_to_one.run && cp -r $OUT/two.run/checkpoints $OUT/two_to_one.run/
timeout 120 $R --include localhost:0 --master_port 29501 scripts/train.py $COMMON --train.output_dir $OUT/two_to_one.run \
  --train.grad_accum 2 --train.resume step00000030 > $OUT/two_to_one.log 2>&1; echo "two_to_one rc=$?"; date -u
for r in two two_to_one; do cp $OUT/$r.run/metrics.jsonl $OUT/$r.metrics.jsonl 2>/dev/null; done
python - <<'PY'
import json, os
out = os.environ["OUT"]
def rows(name):
    try:
        return [json.loads(l) for l in open(f"{out}/{name}.metrics.jsonl")]
    except OSError:
        return []
two = {x["step"]: x["loss"] for x in rows("two") if x["kind"] == "train"}
res = {x["step"]: x["loss"] for x in rows("two_to_one") if x["kind"] == "train"}
for s in sorted(res):
    print(f"step {s}: 2 GPUs {two.get(s)}  resumed on 1 GPU {res[s]}  rel diff {abs(res[s]-two[s])/two[s]:.2e}")
for name in ("two", "two_to_one"):
    print(name, "eval", [{k: v for k, v in x.items() if not isinstance(v, (list, dict))} for x in rows(name) if x["kind"] != "train"])
PY
grep -h "universal\|written by\|exported to\|Error" $OUT/*.log | head -20
