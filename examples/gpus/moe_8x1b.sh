#!/usr/bin/env bash
# A Mixture of Experts on 8 GPUs: the Llama-3.2-1B shape (16 layers, hidden 2048, 32 heads in
# 8 KV groups, RoPE theta 5e5, RMSNorm, tied, vocab 128256) with 8 SwiGLU experts of 8192 per
# layer, top-2 routing, seq 2048: 6.9B parameters, 2.0B active per token.
#
# Expected: at most 2.0 s per iteration of 256 x 2048 tokens (524k), 261k tokens/s; derived,
#   not measured. `bash examples/gpus/moe_8x1b.sh plan` at --efficiency 0.43 (the MFU one H200
#   measured on the dense Llama-3.2-1B shape) gives 2012 ms, without the expert all-to-all
#   (about 29 GiB per GPU and step: 2 exchanges of 4 x 2048 x 2 token copies of 4 KiB per MoE
#   layer, forward and backward, 8 micro-batches; ~0.15 s at 200 GB/s) and the router. So
#   expect about 240k tokens/s; below ~200k, look at the expert balance in the log line.
#   --moe-grouped-gemm (torch._grouped_mm, sm90) measured 2.0x faster than the expert loop.
# Layout: EP 8 (one expert per GPU and layer), DP 8, distributed optimizer: the plan's fastest
#   at EP 8 (the search keeps EP; EP 1 plans 9% slower and at twice the memory, 67 GiB).
NAME=moe_8x1b NPROC=8 NNODES=1 VOCAB=128256 EFFICIENCY=0.43
MODEL=(--num-layers 16 --hidden-size 2048 --ffn-hidden-size 8192 --num-attention-heads 32
       --group-query-attention --num-query-groups 8 --seq-length 2048 --max-position-embeddings 2048
       --position-embedding-type rope --rotary-base 500000 --normalization RMSNorm --swiglu --disable-bias-linear
       --num-experts 8 --moe-router-topk 2 --moe-grouped-gemm --moe-token-dispatcher-type alltoall
       --moe-aux-loss-coeff 1e-2)
PARALLEL=(--expert-model-parallel-size 8 --use-distributed-optimizer --overlap-grad-reduce)
MICRO_BATCH=4 GLOBAL_BATCH=256
SAVE=${SAVE:-checkpoints/$NAME}
TRAIN=(--train-iters 20000 --lr 4e-4 --min-lr 4e-5 --lr-decay-style cosine --lr-warmup-iters 1000
       --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0
       --log-interval 10 --eval-interval 1000 --eval-iters 10 --save "$SAVE" --load "$SAVE" --save-interval 1000)
source "$(dirname "$0")/common.sh"
