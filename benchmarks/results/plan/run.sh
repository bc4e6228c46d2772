#!/usr/bin/env bash
# Reruns every plan in this folder (`pip install -e '.[tpu]'`; about a minute of compiling
# each on a 2-core VM). Usage: bash benchmarks/results/plan/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/plan
export JAX_PLATFORMS=cpu  # Compile-only TPU devices come from libtpu; nothing runs.
GPT="experiments/gpt_stdlib.py model.scan_layers=true precision=bf16"
B6="model.width=4096 model.depth=32 model.heads=32"  # 6.44 G parameters.
B1="model.width=2048 model.depth=16 model.heads=16"  # 806 M parameters.
plan() { local name=$1; shift; jaxbig plan "$@" 2>/dev/null > "$OUT/$name.txt"; }
S2K="model.max_len=2048 data.seq_len=2048"
S8K="model.max_len=8192 data.seq_len=8192"

# The 6.4B model at 2048: the blocks' inputs kept on the device or offloaded to the host.
for r in full offload_input; do
  plan 6b_2k_$r $GPT $B6 $S2K --topology v5p:2x4x4 model.remat=$r mesh.fsdp=32 \
    data.batch_size=128 data.eval_batch_size=128
done
# Sequences of 8192: one per chip, and (6.4B) one per two chips with the context axis.
plan 1b_8k_v5e $GPT $B1 $S8K --topology v5e:4x4 model.remat=full mesh.fsdp=16 \
  data.batch_size=16 data.eval_batch_size=16
plan 6b_8k_v5p $GPT $B6 $S8K --topology v5p:2x4x4 model.remat=full mesh.fsdp=32 \
  data.batch_size=32 data.eval_batch_size=32
plan 6b_8k_v5p_context2 $GPT $B6 $S8K --topology v5p:2x4x4 model.remat=full mesh.fsdp=16 \
  mesh.context=2 data.batch_size=16 data.eval_batch_size=16
# Two v5e:4x4 slices: data parallel across them, FSDP within each.
plan 1b_2k_2xv5e $GPT $B1 $S2K --topology v5e:4x4 --slices 2 model.remat=dots mesh.data=2 \
  mesh.fsdp=16 data.batch_size=128 data.eval_batch_size=128
