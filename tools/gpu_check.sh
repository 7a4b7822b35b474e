#!/usr/bin/env bash
# megakto's first run on a GPU, in one command, offline (meant to take under 8 minutes on one GPU):
#
#   bash tools/gpu_check.sh               # one GPU
#   bash tools/gpu_check.sh --cpu         # the same steps, tiny, on CPU (a minute or two)
#   bash tools/gpu_check.sh --layers 8    # a shallower model where time is short
#
# 1. versions (torch, CUDA, NCCL, deepspeed, transformers, flash_attn, ...) and the device;
# 2. packed rows score as the same sequences alone (megakto/model/packing_check.py) on the device,
#    sdpa in float32 and bfloat16, flash_attention_2 too where flash_attn is installed, on a 2-layer
#    model of the benchmark's width and vocabulary;
# 3. tools/bench.py on a random-init Qwen3-0.6B-shaped model (hidden 1024, 28 layers, 16 heads /
#    8 KV heads, head_dim 128, intermediate 3072, vocabulary 151936; tied head), ZeRO-3 world 1,
#    bfloat16, 2 warmup + 18 timed steps of 32 rows: megakto KTO with the reference offloaded to
#    CPU, megakto KTO with ref.mode=cache, megakto SFT (kto.loss_type=sft, the same engine and
#    tokens); target tokens/s, peak GPU memory and the ratios;
# 4. TRL's KTOTrainer on the same model and rows, where trl is installed (else one line says so);
# 5. memory: a 3-step ZeRO-3 run (2 layers of the same width) beside its dry-run memory plan; on a GPU
#    every allocation recorded (MEGAKTO_CUDA_MEMORY_HISTORY) and what is live at the peak listed by the
#    code that allocated it (tools/cuda_memory_peak.py).
#
# Nothing is downloaded. Packages the machine lacks travel as wheels: MEGAKTO_WHEELS=DIR installs
# every DIR/*.whl with pip --no-index first. The summary goes to $OUT/gpu_check.txt when OUT is
# set, else outputs/gpu_check/summary.txt, beside the benchmark's JSON report, its output and the
# workers' logs. Exit 0 when every step passed.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

MODE=gpu
LAYERS=28
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) MODE=cpu ;;
        --layers) LAYERS=${2:?--layers needs a number of layers}; shift ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1'; use --cpu and/or --layers N" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "gpu_check: $*" >&2; exit 1; }
[[ $LAYERS =~ ^[1-9][0-9]*$ ]] || die "--layers $LAYERS: give a whole number of layers, e.g. --layers 8"

if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate  # the environment tools/install.sh makes, where there is one
fi
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || die "no '$PY' on PATH; set PYTHON=/path/to/python"
if [ -n "${MEGAKTO_WHEELS:-}" ]; then
    compgen -G "$MEGAKTO_WHEELS/*.whl" >/dev/null || die "MEGAKTO_WHEELS=$MEGAKTO_WHEELS holds no .whl files"
    "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links "$MEGAKTO_WHEELS" \
        "$MEGAKTO_WHEELS"/*.whl || die "pip could not install $MEGAKTO_WHEELS/*.whl offline (pip says why above: \
usually a dependency whose wheel is not in the folder; add it there)"
fi

if [ -n "${OUT:-}" ]; then
    DEST=$OUT
    SUMMARY=$OUT/gpu_check.txt
else
    DEST=$REPO/outputs/gpu_check
    SUMMARY=$DEST/summary.txt
fi
mkdir -p "$DEST"
rm -rf "$DEST/gpu_check_bench.json" "$DEST/gpu_check_logs"  # a failed run must not show an earlier run's figures
: > "$SUMMARY"
STDERR=$DEST/gpu_check_stderr.log  # the libraries' warnings; the summary keeps the check's own lines
: > "$STDERR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/megakto-gpu-check.XXXXXX")  # the models: gigabytes, never under OUT
cleanup() {
    mkdir -p "$DEST/gpu_check_logs"
    cp "$WORK"/bench/*.log "$DEST/gpu_check_logs/" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    TQDM_DISABLE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
# NCCL errors and hangs end the job with a report instead of waiting (gpu-readiness audit §4).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN} TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3} \
    TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1} \
    PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

say() { echo "$*" | tee -a "$SUMMARY"; }
FAILED=()
# step NAME ARGS...: one subcommand of tools/_gpu_check.py, which appends its lines to the summary;
# a failure is recorded and the check goes on, so one run reports every step.
step() {
    local name=$1 rc=0
    shift
    "$PY" tools/_gpu_check.py --summary "$SUMMARY" "$@" 2>>"$STDERR" || rc=$?
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name")
    fi
    return 0
}

if [ "$MODE" = cpu ]; then
    DEVICE=cpu
    # A tiny Qwen3 of the same layout; float32, what megakto's dtype=auto picks on CPU.
    SHAPE=(--family qwen3 --vocab 1024 --hidden 64 --layers 2 --heads 4 --kv-heads 2 --head-dim 16
           --intermediate 128)
    RUN=(--batch 4 --warmup 1 --steps 2 --dtype float32 --threads 2 --timeout 300)
else
    DEVICE=cuda
    SHAPE=(--family qwen3 --vocab 151936 --hidden 1024 --layers "$LAYERS" --heads 16 --kv-heads 8 --head-dim 128
           --intermediate 3072)
    THREADS=$(nproc)
    RUN=(--batch 32 --micro-batch 8 --warmup 2 --steps 18 --dtype bfloat16 --threads $((THREADS < 8 ? THREADS : 8))
         --timeout 200)
fi

say "== megakto gpu_check ($MODE mode), $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
step versions versions --device "$DEVICE"
if [ "${#FAILED[@]}" -gt 0 ]; then
    say "gpu_check: FAILED at versions (the line above says what to do); details in $STDERR"
    exit 1
fi
step packing packing --device "$DEVICE" --dir "$WORK/packing-model" "${SHAPE[@]}" --layers 2

SYSTEMS=megakto-kto,megakto-kto-cached,megakto-sft
if "$PY" -c "import trl" 2>/dev/null; then
    SYSTEMS+=,trl-kto
else
    say "trl-kto: not run (trl is not installed; its wheel in MEGAKTO_WHEELS installs it)"
fi
# The benchmark prints as it goes; its full output is kept beside the summary.
rc=0
"$PY" tools/bench.py --systems "$SYSTEMS" "${SHAPE[@]}" "${RUN[@]}" --device "$DEVICE" --set ref.offload=cpu \
    --deepspeed ds_configs/zero3.json --workdir "$WORK/bench" --json "$DEST/gpu_check_bench.json" \
    2>&1 | tee "$DEST/gpu_check_bench.txt" || rc=$?
[ "$rc" -eq 0 ] || FAILED+=(benchmark)
step summary summary "$DEST/gpu_check_bench.json" --workdir "$WORK/bench"
step memory memory --device "$DEVICE" --dir "$WORK/memory" "${SHAPE[@]}" --layers 2

if [ "${#FAILED[@]}" -eq 0 ]; then
    say "gpu_check: passed in ${SECONDS} s; summary in $SUMMARY"
else
    say "gpu_check: FAILED (${FAILED[*]}) in ${SECONDS} s; summary in $SUMMARY, library output in $STDERR," \
        "workers' logs in $DEST/gpu_check_logs"
    exit 1
fi
