#!/usr/bin/env bash
# A tiny Llama-style model on the built-in corpus (Python stdlib sources, byte-level tokens), on CPU:
# RoPE, RMSNorm, SwiGLU, no linear biases, untied output layer and grouped-query attention
# (4 query heads sharing 2 key/value groups), with tensor parallelism 2 + sequence parallelism.
# About 15 s on 2 CPU cores; the lm loss falls from ~5.5 (ln 257: a uniform guess) to ~3.2 in 40 iterations.
#
#   bash examples/llama_tiny.sh                 # 2 processes: TP=2 with --sequence-parallel
#   NPROC=4 bash examples/llama_tiny.sh --context-parallel-size 2   # extra flags are appended
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-2}

torchrun --nproc_per_node "$NPROC" pretrain_gpt.py \
    --num-layers 4 --hidden-size 64 --num-attention-heads 4 \
    --group-query-attention --num-query-groups 2 \
    --seq-length 64 --max-position-embeddings 64 \
    --position-embedding-type rope --rotary-base 10000 \
    --normalization RMSNorm --swiglu --disable-bias-linear \
    --untie-embeddings-and-output-weights \
    --tensor-model-parallel-size 2 --sequence-parallel \
    --micro-batch-size 4 --global-batch-size 8 \
    --train-iters 40 --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 4 \
    --weight-decay 0.1 --clip-grad 1.0 --attention-dropout 0.0 --hidden-dropout 0.0 \
    --log-interval 5 --eval-interval 20 --eval-iters 2 --seed 1234 --device cpu \
    "$@"
