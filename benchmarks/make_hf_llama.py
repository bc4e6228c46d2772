"""Writes a random Llama-style Hugging Face folder (config.json, model.safetensors,
tokenizer.json) without torch, for measuring `jaxbig import-hf` on a large model here.

  python benchmarks/make_hf_llama.py OUT [--width 2048 --depth 16 --mlp 8192 --vocab 32000
      --heads 32 --kv-heads 8 --dtype float32]

The defaults give 1.10B parameters (Llama 3.2 1B's blocks with a 32k vocabulary, untied
output layer). The tensors are written one shard per block so that this script never holds
more than one block (about 250 MB in float32) in memory; the tokenizer is a byte-level BPE
trained on a few sentences (its vocabulary is far below the embedding's, which is allowed).
"""

from __future__ import annotations

import argparse
import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file


def _tokenizer(path: str) -> None:
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(['the quick brown fox jumps over the lazy dog'] * 10,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=['<|end_of_text|>'], initial_alphabet=
                                              pre_tokenizers.ByteLevel.alphabet()))
  tok.save(path)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('out')
  p.add_argument('--width', type=int, default=2048)
  p.add_argument('--depth', type=int, default=16)
  p.add_argument('--mlp', type=int, default=8192)
  p.add_argument('--vocab', type=int, default=32000)
  p.add_argument('--heads', type=int, default=32)
  p.add_argument('--kv-heads', type=int, default=8)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  a = p.parse_args()
  os.makedirs(a.out)
  dtype = np.float32 if a.dtype == 'float32' else ml_dtypes.bfloat16
  rng = np.random.default_rng(0)
  e, d = a.width, a.width // a.heads

  def w(*shape):
    return (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype)

  shards, weight_map, total = [], {}, 0

  def write(tensors: dict) -> None:
    nonlocal total
    name = f'model-{len(shards) + 1:05d}.safetensors'
    save_file(tensors, os.path.join(a.out, name), metadata={'format': 'pt'})
    shards.append(name)
    for k, v in tensors.items():
      weight_map[k] = name
      total += v.nbytes

  write({'model.embed_tokens.weight': w(a.vocab, e), 'lm_head.weight': w(a.vocab, e),
         'model.norm.weight': np.ones(e, dtype)})
  for i in range(a.depth):
    pre = f'model.layers.{i}.'
    write({pre + 'input_layernorm.weight': np.ones(e, dtype),
           pre + 'post_attention_layernorm.weight': np.ones(e, dtype),
           pre + 'self_attn.q_proj.weight': w(a.heads * d, e),
           pre + 'self_attn.k_proj.weight': w(a.kv_heads * d, e),
           pre + 'self_attn.v_proj.weight': w(a.kv_heads * d, e),
           pre + 'self_attn.o_proj.weight': w(e, a.heads * d),
           pre + 'mlp.gate_proj.weight': w(a.mlp, e),
           pre + 'mlp.up_proj.weight': w(a.mlp, e),
           pre + 'mlp.down_proj.weight': w(e, a.mlp)})
  with open(os.path.join(a.out, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)
  config = {'model_type': 'llama', 'architectures': ['LlamaForCausalLM'],
            'vocab_size': a.vocab, 'hidden_size': e, 'num_hidden_layers': a.depth,
            'num_attention_heads': a.heads, 'num_key_value_heads': a.kv_heads,
            'intermediate_size': a.mlp, 'max_position_embeddings': 2048,
            'rms_norm_eps': 1e-5, 'rope_theta': 500000.0, 'hidden_act': 'silu',
            'tie_word_embeddings': False, 'dtype': a.dtype}
  with open(os.path.join(a.out, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  _tokenizer(os.path.join(a.out, 'tokenizer.json'))
  n = total // np.dtype(dtype).itemsize
  print(json.dumps({'out': a.out, 'params': int(n), 'bytes': int(total),
                    'shards': len(shards)}))


if __name__ == '__main__':
  main()
