#!/usr/bin/env bash
# 2-GPU ZeRO-3 run of the tiny recipe, the same run on 1 GPU (2 accumulation steps = same global batch and
# documents), and the 2-GPU checkpoint of step 120 resumed on 1 GPU. Logs + metrics to $OUT.
# Run from the repository root on a machine with 2 GPUs: bash bench/train_zero3_2gpu.sh  (OUT=dir for logs).
# On the project's device boxes DeepSpeed comes from carried wheels in .whl/ (installed below when present).
OUT=${OUT:-runs/zero3_2gpu}; mkdir -p "$OUT"; export OUT
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpus.txt
python -c "import torch,deepspeed;print(torch.__version__,deepspeed.__version__,torch.cuda.device_count())" | tee -a $OUT/gpus.txt
COMMON="--config configs/tiny.yaml --deepspeed configs/ds_zero3.json --train.max_steps 240 --train.save_every 120 \
 --train.eval_every 120 --data.eval_docs 600 --train.generate_eval_docs 0 --train.log_every 10 --data.num_workers 6 \
 --train.tensorboard false --train.micro_batch_size 128"
R="python -m deepspeed.launcher.runner"
date -u
timeout 240 $R --num_gpus 2 --master_port 29500 scripts/train.py $COMMON --train.output_dir $OUT/two.run \
  --train.grad_accum 1 > $OUT/two.log 2>&1; echo "two rc=$?"; date -u
mkdir -p $OUT/two_to_one.run && cp -r $OUT/two.run/checkpoints $OUT/two_to_one.run/
timeout 200 $R --include localhost:0 --master_port 29501 scripts/train.py $COMMON --train.output_dir $OUT/one.run \
  --train.grad_accum 2 > $OUT/one.log 2>&1 & P1=$!
timeout 200 $R --include localhost:1 --master_port 29502 scripts/train.py $COMMON --train.output_dir $OUT/two_to_one.run \
  --train.grad_accum 2 --train.resume step00000120 > $OUT/two_to_one.log 2>&1 & P2=$!
wait $P1; echo "one rc=$?"; wait $P2; echo "two_to_one rc=$?"; date -u
for r in two one two_to_one; do cp $OUT/$r.run/metrics.jsonl $OUT/$r.metrics.jsonl 2>/dev/null; done
python - <<'PY'
import json, os
out = os.environ["OUT"]
def rows(name):
    try:
        return [json.loads(l) for l in open(f"{out}/{name}.metrics.jsonl")]
    except OSError:
        return []
for name in ("two", "one", "two_to_one"):
    r = rows(name)
    tr = [(x["step"], round(x["loss"], 4)) for x in r if x["kind"] == "train"]
    ev = [{k: v for k, v in x.items() if not isinstance(v, (list, dict))} for x in r if x["kind"] != "train"]
    print(name, "train", tr)
    print(name, "eval", ev)
PY
grep -h "universal\|written by\|exported to\|Error\|error" $OUT/*.log | head -20
