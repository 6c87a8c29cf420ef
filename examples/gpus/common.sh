# The launcher, the plan and the smoke run of one recipe of examples/gpus/ (sourced by each).
#
# A recipe sets NAME, NPROC (GPUs per node), NNODES, VOCAB, EFFICIENCY (the achieved fraction of
# the GPU's peak that tools/plan.py assumes, calibrated on a measurement: see the recipe), the
# arrays MODEL, PARALLEL, TRAIN, and MICRO_BATCH, GLOBAL_BATCH; then sources this file with its
# command-line arguments:
#
#   bash examples/gpus/RECIPE.sh [FLAG ...]  train: torchrun on this node, the FLAGs appended
#                                            (with NNODES > 1: on every node, RDZV_HOST=first node)
#   bash examples/gpus/RECIPE.sh plan        the tools/plan.py search that chose PARALLEL (CPU only)
#   bash examples/gpus/RECIPE.sh smoke       the same model at 2 layers on one GPU, 10 iterations
#   bash examples/gpus/RECIPE.sh print       the three commands, one a line
#
# Data: DATA_ARGS (default "--mock-data --vocab-size $VOCAB": random tokens, the throughput
# check), e.g. DATA_ARGS="--data-path my_text_document --tokenizer-type GPT2BPETokenizer
# --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt" (docs/data.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MODE=train
case "${1:-}" in plan|smoke|print) MODE=$1; shift ;; esac
read -r -a DATA <<< "${DATA_ARGS:---mock-data --vocab-size $VOCAB}"
BATCH=(--micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH" --bf16)
if [ "$NNODES" -gt 1 ]; then  # c10d rendezvous at the first node (examples/multinode.md)
    LAUNCH=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "${RDZV_HOST:-FIRST_NODE}:29500" --rdzv-id "$NAME")
else
    LAUNCH=(--standalone)
fi
TRAIN_CMD=(torchrun "${LAUNCH[@]}" --nproc_per_node "$NPROC" pretrain_gpt.py --device cuda
           "${MODEL[@]}" "${PARALLEL[@]}" "${BATCH[@]}" "${TRAIN[@]}" "${DATA[@]}" "$@")
PLAN_CMD=(python tools/plan.py "${MODEL[@]}" "${PARALLEL[@]}" "${BATCH[@]}" --mock-data --vocab-size "$VOCAB"
          --world-size $((NNODES * NPROC)) --search --top 5 --device-memory-gb 76 --efficiency "$EFFICIENCY")
SMOKE_CMD=(torchrun --standalone --nproc_per_node 1 pretrain_gpt.py --device cuda "${MODEL[@]}" --num-layers 2
           "${BATCH[@]}" --global-batch-size $((2 * MICRO_BATCH)) --train-iters 10 --log-interval 1
           --eval-interval 0 --mock-data --vocab-size "$VOCAB")
case $MODE in
    plan) exec "${PLAN_CMD[@]}" ;;
    smoke) exec "${SMOKE_CMD[@]}" ;;
    print) show() { printf '%q ' "$@"; echo; }
           show "${TRAIN_CMD[@]}"; show "${PLAN_CMD[@]}"; show "${SMOKE_CMD[@]}" ;;
    train) if [ "$NNODES" -gt 1 ] && [ -z "${RDZV_HOST:-}" ]; then
               echo "$NAME: set RDZV_HOST to the first node's host name (the same on every node)" >&2; exit 2
           fi
           exec "${TRAIN_CMD[@]}" ;;
esac
