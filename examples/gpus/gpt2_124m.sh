#!/usr/bin/env bash
# GPT-2 124M on one GPU (12 layers, hidden 768, 12 heads, seq 1024, GPT-2's 50257 tokens).
#
# Expected: 112 ms per iteration of 32 x 1024 tokens, 293k tokens/s, 25.2% MFU.
#   Measured: one H200, torch 2.11, bf16, no flash-attn / Transformer Engine / apex; this
#   shape and batch (micro-batch 8, 4 micro-batches), megalite's Trainer as pretrain_gpt.py
#   builds it. `bash examples/gpus/gpt2_124m.sh plan` at --efficiency 0.252 (that MFU) predicts
#   112.4 ms. A model this small leaves the GPU a third idle (kernel launches, the optimizer);
#   a larger --micro-batch-size raises the MFU (memory: 5.9 GiB at 8).
# Layout: one GPU, no recompute (the plan's first choice; selective and full are slower).
NAME=gpt2_124m NPROC=1 NNODES=1 VOCAB=50257 EFFICIENCY=0.252
MODEL=(--num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024 --max-position-embeddings 1024)
PARALLEL=()
MICRO_BATCH=8 GLOBAL_BATCH=32
SAVE=${SAVE:-checkpoints/$NAME}
TRAIN=(--train-iters 20000 --lr 6e-4 --min-lr 6e-5 --lr-decay-style cosine --lr-warmup-iters 500
       --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0
       --log-interval 10 --eval-interval 1000 --eval-iters 20 --save "$SAVE" --load "$SAVE" --save-interval 2000)
source "$(dirname "$0")/common.sh"
