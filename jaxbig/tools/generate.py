"""Sampling text from a trained byte language model.

The model runs in decode mode (`decode=True`): its 'cache' collection holds what the next
step needs (the Transformer's keys and values, the RNN's carries), so the prompt is read
once and every new byte costs one single-position step. The whole loop is one jitted
`lax.scan`. Shapes: B batch (1 here), P prompt length, V vocabulary.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxbig import models, precision
from jaxbig.config import ConfigError


def encode_prompt(prompt: str, vocab_size: int) -> np.ndarray:
  """The prompt's UTF-8 bytes as int32 tokens; a one-line error for prompts the model can't read."""
  if not prompt:
    raise ConfigError('--prompt: must not be empty (the model needs at least one byte)')
  try:
    data = prompt.encode('utf-8')
  except UnicodeEncodeError as e:
    raise ConfigError(f'--prompt: not valid UTF-8 text ({e.reason} at character {e.start})') \
        from None
  tokens = np.frombuffer(data, np.uint8).astype(np.int32)
  if tokens.max() >= vocab_size:
    raise ConfigError(f'--prompt: byte {tokens.max()} is outside the model vocabulary '
                      f'(0..{vocab_size - 1})')
  return tokens


def pick(logits_BxV: jax.Array, rng: jax.Array, temperature: float, top_k: int,
         valid: int | None = None) -> jax.Array:
  """Next tokens: argmax at temperature 0, else a sample from the (top-k) softened softmax;
  ids from `valid` on (the vocabulary's padding rows) are never picked."""
  if valid is not None and valid < logits_BxV.shape[-1]:
    logits_BxV = logits_BxV.at[:, valid:].set(-jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('decoder', 'num_tokens', 'temperature', 'top_k',
                                             'valid'))
def _decode(params, cache, prompt_BxP: jax.Array, rng: jax.Array, *, decoder: nn.Module,
            num_tokens: int, temperature: float, top_k: int, valid: int | None) -> jax.Array:
  """Reads the prompt into the cache, then samples `num_tokens` one position at a time."""

  def step(cache, tokens_BxT):
    logits_BxTxV, new = decoder.apply({'params': params, 'cache': cache}, tokens_BxT,
                                      train=False, mutable=['cache'])
    return new['cache'], logits_BxTxV[:, -1]

  def body(carry, key):
    cache, logits_BxV = carry
    token_B = pick(logits_BxV, key, temperature, top_k, valid)
    return step(cache, token_B[:, None]), token_B[0]

  _, tokens = jax.lax.scan(body, step(cache, prompt_BxP), jax.random.split(rng, num_tokens))
  return tokens


def sample(model: nn.Module, params, prompt_P: np.ndarray, num_tokens: int, *,
           temperature: float = 1.0, top_k: int = 0, seed: int = 0,
           valid: int | None = None) -> np.ndarray:
  """`num_tokens` new tokens after the prompt, decoded with the model's cache."""
  decoder = model.clone(decode=True)
  cache_len = getattr(model, 'max_len', 1)  # The KV cache spans max_len; RNN carries any.
  # A fresh cache is all zeros (index 0); its shapes come from tracing init, not running it.
  shapes = jax.eval_shape(lambda: decoder.init(
      jax.random.key(0), jnp.zeros((1, cache_len), jnp.int32), train=False)['cache'])
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
  tokens = _decode(params, cache, jnp.asarray(prompt_P)[None], jax.random.key(seed),
                   decoder=decoder, num_tokens=num_tokens, temperature=float(temperature),
                   top_k=int(top_k), valid=valid)
  return np.asarray(tokens)


MAX_TOKENS = 65536  # --max-tokens' default: the cap on --tokens where no max_len caps it.


def check_options(num_tokens: int, temperature: float, seed: int, max_tokens: int) -> None:
  """Refuses sampling options that need no model to judge, before one is loaded."""
  if num_tokens <= 0:
    raise ConfigError(f'--tokens must be > 0, got {num_tokens}')
  if max_tokens <= 0:
    raise ConfigError(f'--max-tokens must be > 0, got {max_tokens}')
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ConfigError(f'--temperature must be finite and >= 0, got {temperature}')
  if not 0 <= seed < 2**32:  # A PRNG key's seed: larger ones overflow.
    raise ConfigError(f'--seed must be in 0..{2**32 - 1}, got {seed}')


def generate(workdir: str, prompt: str, num_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0, max_tokens: int = MAX_TOKENS) -> str:
  """The prompt followed by `num_tokens` sampled bytes, as text (bad UTF-8 replaced).

  `max_tokens` caps `num_tokens` for models without a context limit (RNNs): the scan's
  output and the compile grow with it. A Transformer is capped by its max_len instead.
  """
  from jaxbig.tools import inference
  check_options(num_tokens, temperature, seed, max_tokens)
  s, state, _, meta = inference.load(workdir)
  cfg = s.config
  if meta.task != 'lm' or cfg.model.name not in models.LANGUAGE_MODELS:
    raise ConfigError(f'{workdir}: generate needs a language model; this run trained '
                      f'model.name={cfg.model.name} on data.name={cfg.data.name}')
  if not 0 <= top_k <= meta.vocab_size:
    raise ConfigError(f'--top-k must be in 0..{meta.vocab_size}, got {top_k}')
  if cfg.data.name == 'random_tokens':
    raise ConfigError(f'{workdir}: trained on data.name=random_tokens, which has no text to '
                      'read a prompt into')
  tok = getattr(s.data, 'tokenizer', None)  # Prepared token shards; bytes otherwise.
  if tok is None:
    prompt_P = encode_prompt(prompt, meta.vocab_size)
  else:
    encode_prompt(prompt, 256)  # The same checks: not empty, valid UTF-8.
    prompt_P = tok.encode(prompt)
    if not len(prompt_P):
      raise ConfigError('--prompt: must not be empty (the model needs at least one token)')
  eos = getattr(s.model, 'doc_eos', -1)
  if eos >= 0:  # Packed documents: the end token opens a document, as in training.
    prompt_P = np.concatenate([[eos], prompt_P]).astype(prompt_P.dtype)
  max_len = getattr(s.model, 'max_len', None)
  if max_len is not None and len(prompt_P) + num_tokens > max_len:
    raise ConfigError(f'--tokens: the prompt ({len(prompt_P)} bytes) + --tokens ({num_tokens}) '
                      f'exceeds model.max_len ({max_len})')
  if max_len is None and num_tokens > max_tokens:
    raise ConfigError(f'--tokens ({num_tokens}) exceeds --max-tokens ({max_tokens}); raise '
                      '--max-tokens to generate more')
  with precision.tracing(s.policy):  # The run's matmul precision.
    new = sample(s.model, state.params, prompt_P, num_tokens, temperature=temperature,
                 top_k=top_k, seed=seed, valid=meta.num_classes)
  if eos >= 0:  # One document: up to the first end token.
    ends = np.flatnonzero(new == eos)
    prompt_P, new = prompt_P[1:], new[:ends[0]] if len(ends) else new
  if tok is not None:
    return tok.decode(np.concatenate([prompt_P, new]))
  return (prompt_P.astype(np.uint8).tobytes() + new.astype(np.uint8).tobytes()).decode(
      'utf-8', errors='replace')
