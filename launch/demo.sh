#!/usr/bin/env bash
# The quickstart: install into .venv, make the tiny model and the sorting demo data locally, then
# train with 2 CPU processes under the deepspeed launcher (ZeRO-3 policy, reference offloaded to CPU).
# Extra arguments are config overrides, e.g. `bash launch/demo.sh train.max_steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
. .venv/bin/activate
[ -f outputs/tiny-model/config.json ] || python tools/make_tiny_model.py outputs/tiny-model
[ -f outputs/demo-data/train.jsonl ] || python tools/make_demo_data.py outputs/demo-data
OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" launch/train_kto.py \
    --config configs/tiny_demo.yaml --deepspeed ds_configs/zero3.json "$@"
echo "TensorBoard logs: outputs/tiny_demo/tensorboard  (open with: .venv/bin/tensorboard --logdir outputs/tiny_demo/tensorboard)"
