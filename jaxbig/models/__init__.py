"""Model registry: `build(config.model, meta)` turns a config into a Flax module.

Each factory reads the fields its model needs from the ConfigDict and passes explicit
attributes, so modules never see the config. To add a model, write its file and add a
factory to `_FACTORIES` (and to `_WITH_BATCH_STATS` if it keeps BatchNorm statistics).
"""

from typing import Any, Callable, Protocol

import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from jaxbig import kernels as kernels_lib
from jaxbig.config import ConfigError
from jaxbig.models import init as inits, mlp, rnn, transformer, vae
from jaxbig.models.cnn import CNN
from jaxbig.models.mlp import MLP
from jaxbig.models.resnet import ResNet18, ResNet34, ResNet50, ResNetTiny


class DataMeta(Protocol):
  """The fields of `jaxbig.data.DataMeta` that a model factory reads."""

  input_shape: tuple  # Per example, e.g. (8, 8, 1), (10,) or (seq_len,) tokens.
  num_outputs: int
  task: str  # 'lm' makes sequence models language models; otherwise they classify.
  vocab_size: int  # > 0: inputs are int tokens.


Factory = Callable[[ml_collections.ConfigDict, DataMeta, Any, kernels_lib.Kernels], nn.Module]


def _needs_image(cfg: ml_collections.ConfigDict, meta: DataMeta) -> None:
  """Raises unless the data gives per-example images (H, W, C)."""
  if len(meta.input_shape) != 3:
    raise ConfigError(
        f"model.name: '{cfg.name}' needs image inputs (H, W, C); the data gives "
        f"{tuple(meta.input_shape)}")


def _needs_sequence(cfg: ml_collections.ConfigDict, meta: DataMeta) -> int:
  """Raises unless the data gives tokens (L,), float sequences (L, F) or images (H, W, C)
  (read row by row); returns the sequence length."""
  rank = len(meta.input_shape)
  if (meta.vocab_size and rank != 1) or (not meta.vocab_size and rank not in (2, 3)):
    raise ConfigError(
        f"model.name: '{cfg.name}' reads tokens (L,), sequences (L, F) or images (H, W, C); "
        f'the data gives {tuple(meta.input_shape)}')
  return meta.input_shape[0]


def _choice(cfg: ml_collections.ConfigDict, field: str, choices: tuple) -> None:
  value = getattr(cfg, field)  # AttributeError for an undeclared field: see build().
  if value not in choices:
    raise ConfigError(f"model.{field}: unknown '{value}'; choose from {', '.join(choices)}")


def _cnn(cfg: ml_collections.ConfigDict, meta: DataMeta, dtype: Any,
         kernels: kernels_lib.Kernels) -> nn.Module:
  """Builds the CNN."""
  _needs_image(cfg, meta)
  # tuple(): CLI overrides may hand in lists; module attributes should be hashable.
  return CNN(
      num_outputs=meta.num_outputs, features=tuple(cfg.features), hidden=cfg.hidden,
      dropout=cfg.dropout, init_name=cfg.init, init_std=cfg.init_std, dtype=dtype,
      conv=kernels.conv)


def _mlp(cfg: ml_collections.ConfigDict, meta: DataMeta, dtype: Any,
         kernels: kernels_lib.Kernels) -> nn.Module:
  """Builds the MLP."""
  del kernels  # No fast path.
  _choice(cfg, 'activation', mlp.ACTIVATIONS)
  return MLP(
      num_outputs=meta.num_outputs, widths=tuple(cfg.widths), activation=cfg.activation,
      dropout=cfg.dropout, init_name=cfg.init, init_std=cfg.init_std, dtype=dtype)


def _resnet(size: Callable[..., nn.Module]) -> Factory:
  """Returns a factory for one ResNet size partial."""

  def factory(cfg: ml_collections.ConfigDict, meta: DataMeta, dtype: Any,
              kernels: kernels_lib.Kernels) -> nn.Module:
    _needs_image(cfg, meta)
    return size(
        num_outputs=meta.num_outputs, width=cfg.width, small_input=cfg.small_input,
        init_name=cfg.init, init_std=cfg.init_std, dtype=dtype, conv=kernels.conv)

  return factory


def _transformer(cfg: ml_collections.ConfigDict, meta: DataMeta, dtype: Any,
                 kernels: kernels_lib.Kernels, platform: str = '', context: int = 1
                 ) -> nn.Module:
  """A decoder LM on text, an encoder classifier on anything else."""
  length = _needs_sequence(cfg, meta)
  if length % context:
    raise ConfigError(f'mesh.context={context} must divide the sequence length ({length}): '
                      'each context device holds an equal part of every sequence')
  common = dict(
      width=cfg.width, depth=cfg.depth, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
      mlp_dim=cfg.get('mlp_dim', 0),
      max_len=cfg.max_len, pos=cfg.pos, dropout=cfg.dropout,
      attention=attention_path(cfg, meta, dtype, platform, length, context),
      remat=_remat(cfg), scan_layers=cfg.scan_layers, init_std=cfg.init_std, dtype=dtype,
      heads_major=kernels.attention == 'heads_major',
      # Decoder options, declared by the experiments that change them; these are the
      # behaviour of runs from before they existed.
      kv_heads=cfg.get('kv_heads', 0), mlp=cfg.get('mlp', 'gelu'),
      use_bias=cfg.get('bias', False), rope_theta=float(cfg.get('rope_theta', 10_000.0)),
      norm_eps=float(cfg.get('norm_eps', 1e-6)), norm=cfg.get('norm', 'rms'))
  if cfg.width % cfg.heads:
    raise ConfigError(f'model.width ({cfg.width}) must be divisible by model.heads ({cfg.heads})')
  _choice(cfg, 'pos', transformer.POSITIONS)
  if cfg.pos == 'rope' and (cfg.width // cfg.heads) % 2:
    raise ConfigError(f'model.pos=rope needs an even head size, got {cfg.width // cfg.heads}')
  kv_heads = common['kv_heads']
  if kv_heads < 0 or (kv_heads and cfg.heads % kv_heads):
    raise ConfigError(f'model.kv_heads ({kv_heads}) must divide model.heads ({cfg.heads}); 0 '
                      'means one per query head')
  if common['mlp_dim'] < 0:
    raise ConfigError(f"model.mlp_dim must be >= 0 (0: width x mlp_ratio), got {common['mlp_dim']}")
  if common['norm'] not in transformer.NORMS:
    raise ConfigError(f"model.norm: unknown '{common['norm']}'; choose from "
                      f"{', '.join(transformer.NORMS)}")
  if common['mlp'] not in transformer.MLPS:
    raise ConfigError(f"model.mlp: unknown '{common['mlp']}'; choose from "
                      f"{', '.join(transformer.MLPS)}")
  for field in ('rope_theta', 'norm_eps'):
    if not common[field] > 0:
      raise ConfigError(f'model.{field} must be > 0, got {common[field]}')
  if length > cfg.max_len:
    raise ConfigError(f'data.seq_len ({length}) exceeds model.max_len ({cfg.max_len})')
  if meta.task == 'lm':
    vocab = cfg.get('vocab_size', 0) or meta.vocab_size
    if vocab < meta.num_classes:  # An imported model's own table; the tokenizer must fit.
      raise ConfigError(f'model.vocab_size ({vocab}) is smaller than the tokenizer\'s '
                        f'vocabulary ({meta.num_classes})')
    return transformer.TransformerLM(vocab_size=vocab,
                                     tie_embeddings=cfg.tie_embeddings,
                                     logits_chunk=_logits_chunk(cfg), doc_eos=meta.doc_eos,
                                     **common)
  return transformer.TransformerClassifier(num_outputs=meta.num_outputs,
                                           vocab_size=meta.vocab_size, **common)


# cuDNN's fused (flash) attention: half-precision inputs, head sizes it has kernels for.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD = 128


def attention_path(cfg: ml_collections.ConfigDict, meta: DataMeta, dtype: Any,
                   platform: str, length: int = 0, context: int = 1) -> str:
  """`model.attention` resolved for the devices: 'cudnn', 'flash' or 'xla'. `auto` takes
  cuDNN's fused attention on NVIDIA GPUs where it applies (bf16/fp16, a head size that is
  a multiple of 8 up to 128, no packed-document mask, no context split), the Pallas splash
  kernel on TPUs (each context device's part of a sequence a multiple of 128; packed
  documents are its segments) and XLA's path otherwise (on CPUs the kernel policy may lay
  it out heads-major); `cudnn` or `flash` where it cannot apply is a ConfigError."""
  _choice(cfg, 'attention', transformer.ATTENTIONS)
  if cfg.attention == 'xla':
    return 'xla'
  elsewhere = f'this run compiles for {platform or "an unknown platform"}'
  if cfg.attention == 'flash' or (cfg.attention == 'auto' and platform == 'tpu'):
    kernel, why = 'flash', None
    if platform != 'tpu' and not transformer.interpreting():  # Tests run it interpreted.
      why = f'a TPU ({elsewhere})'
    elif (length // context) % transformer.FLASH_BLOCK:
      per = f'{length} / mesh.context={context} = ' if context > 1 else ''
      why = (f'a sequence length (per context device) that is a multiple of '
             f'{transformer.FLASH_BLOCK} (got {per}{length // context})')
  else:
    kernel, why = 'cudnn', None
    head = cfg.width // cfg.heads if cfg.heads else 0
    if platform not in ('gpu', 'cuda'):
      why = f'an NVIDIA GPU ({elsewhere})'
    elif jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
      why = f'bf16 or fp16 compute (precision gives {jnp.dtype(dtype).name})'
    elif head % 8 or head > CUDNN_MAX_HEAD:
      why = f'a head size that is a multiple of 8 up to {CUDNN_MAX_HEAD} (got {head})'
    elif meta.doc_eos >= 0:
      why = 'no packed-document mask (data.pack=true)'
    elif context > 1:
      why = f'the whole sequence on each device (mesh.context={context})'
  if why is None:
    return kernel
  if cfg.attention == kernel:
    raise ConfigError(f'model.attention={kernel} needs {why}; use model.attention=auto')
  if platform in ('gpu', 'cuda', 'tpu'):  # Where a fused kernel was expected.
    from jaxbig import metrics  # pylint: disable=g-import-not-at-top
    metrics.note(f"attention: XLA's, not the {kernel} kernel: it needs {why}")
  return 'xla'


def _lora(lora: ml_collections.ConfigDict | None, cfg: ml_collections.ConfigDict) -> dict:
  """The Transformer's LoRA attributes from the `lora` section (none where rank is 0)."""
  if lora is None or not lora.get('rank', 0):
    return {}
  if lora.rank < 0 or not lora.alpha > 0:
    raise ConfigError(f'lora.rank must be >= 0 and lora.alpha > 0, got {lora.rank}, '
                      f'{lora.alpha}')
  names = [t.strip() for t in str(lora.targets).split(',') if t.strip()]
  unknown = [t for t in names if t not in transformer.LORA_TARGETS]
  if not names or unknown:
    raise ConfigError(f"lora.targets: '{(unknown or [lora.targets])[0]}' matches no "
                      f"projection; choose from {', '.join(transformer.LORA_TARGETS)}")
  targets = tuple(p for t in names for p in transformer.LORA_TARGETS[t])
  if cfg.get('mlp', 'gelu') != 'swiglu':
    targets = tuple(p for p in targets if p != 'mlp_gate')
  return dict(lora_rank=int(lora.rank), lora_alpha=float(lora.alpha), lora_targets=targets)


def _remat(cfg: ml_collections.ConfigDict) -> str:
  try:
    return transformer.remat_name(cfg.remat)
  except ValueError as e:
    raise ConfigError(f'model.remat: {e}') from None


def _logits_chunk(cfg: ml_collections.ConfigDict) -> int:
  chunk = cfg.get('logits_chunk', 0)
  if chunk < 0:
    raise ConfigError(f'model.logits_chunk must be >= 0 (0: whole logits), got {chunk}')
  return chunk


def _rnn(cell: str) -> Factory:
  """Returns a factory for an LSTM or GRU: an LM on text, a classifier otherwise."""

  def factory(cfg: ml_collections.ConfigDict, meta: DataMeta, dtype: Any,
              kernels: kernels_lib.Kernels) -> nn.Module:
    _needs_sequence(cfg, meta)
    common = dict(cell=cell, hidden=cfg.hidden, depth=cfg.depth, dropout=cfg.dropout,
                  init_name=cfg.init, init_std=cfg.init_std, dtype=dtype,
                  fused_grad=kernels.rnn_grad == 'fused')
    if meta.task == 'lm':
      if cfg.bidirectional:
        raise ConfigError('model.bidirectional: a language model must not see the future')
      if cfg.tie_embeddings and cfg.embed_dim and cfg.embed_dim != cfg.hidden:
        raise ConfigError(f'model.tie_embeddings needs model.embed_dim == model.hidden, got '
                          f'{cfg.embed_dim} and {cfg.hidden}')
      return rnn.RNNLM(vocab_size=meta.vocab_size, embed_dim=cfg.embed_dim,
                       tie_embeddings=cfg.tie_embeddings, logits_chunk=_logits_chunk(cfg),
                       **common)
    _choice(cfg, 'pool', rnn.POOLS)
    return rnn.RNNClassifier(num_outputs=meta.num_outputs, vocab_size=meta.vocab_size,
                             bidirectional=cfg.bidirectional, pool=cfg.pool, **common)

  return factory


def _autoencoder(variational: bool) -> Factory:
  """Returns a factory for the autoencoder or the VAE."""

  def factory(cfg: ml_collections.ConfigDict, meta: DataMeta, dtype: Any,
              kernels: kernels_lib.Kernels) -> nn.Module:
    del kernels  # No fast path.
    _needs_image(cfg, meta)
    cls = vae.VAE if variational else vae.AutoEncoder
    return cls(input_shape=tuple(meta.input_shape), widths=tuple(cfg.widths), latent=cfg.latent,
               init_name=cfg.init, init_std=cfg.init_std, dtype=dtype)

  return factory


_FACTORIES: dict[str, Factory] = {
    'cnn': _cnn,
    'mlp': _mlp,
    'resnet18': _resnet(ResNet18),
    'resnet34': _resnet(ResNet34),
    'resnet50': _resnet(ResNet50),
    'resnet_tiny': _resnet(ResNetTiny),
    'transformer': _transformer,
    'lstm': _rnn('lstm'),
    'gru': _rnn('gru'),
    'autoencoder': _autoencoder(variational=False),
    'vae': _autoencoder(variational=True),
}
# Models that generate text: `jaxbig generate` runs them with decode=True.
LANGUAGE_MODELS = frozenset({'transformer', 'lstm', 'gru'})
MODELS = tuple(_FACTORIES)
_WITH_BATCH_STATS = frozenset({'resnet18', 'resnet34', 'resnet50', 'resnet_tiny'})


def _check_name(name: str) -> None:
  """Raises a ConfigError that lists the known models unless `name` is one."""
  if name not in _FACTORIES:
    raise ConfigError(f"model.name: unknown model '{name}'; choose from {', '.join(MODELS)}")


def build(cfg: ml_collections.ConfigDict, meta: DataMeta, dtype: Any = jnp.float32,
          kernels: kernels_lib.Kernels = kernels_lib.REFERENCE, platform: str = 'cpu',
          context: int = 1, lora: ml_collections.ConfigDict | None = None) -> nn.Module:
  """Returns the module named by `cfg.name`, computing in `dtype` with float32 params and
  the fast paths that `kernels` chose (jaxbig/kernels) for devices of `platform`, its
  sequences split over `context` devices (mesh.context). Raises ConfigError for a config
  this model cannot be built from, or cannot take this data's inputs."""
  _check_name(cfg.name)
  _check_sizes(cfg)
  if 'init' in cfg:
    _choice(cfg, 'init', inits.INITIALIZERS)
  if meta.doc_eos >= 0 and cfg.name != 'transformer':
    raise ConfigError(f'data.pack: packed documents need model.name=transformer, not '
                      f'{cfg.name}; set data.pack=false')
  rank = lora.get('rank', 0) if lora is not None else 0
  if rank and cfg.name != 'transformer':
    raise ConfigError(f'lora.rank={rank}: LoRA adapts Transformer projections; model.name='
                      f'{cfg.name} has none (set lora.rank=0)')
  if context > 1 and cfg.name != 'transformer':
    raise ConfigError(f'mesh.context={context} splits sequence positions, which only '
                      f'model.name=transformer attends across; set mesh.context=1 for {cfg.name}')
  try:
    if cfg.name == 'transformer':
      return _transformer(cfg, meta, dtype, kernels, platform, context).clone(
          **_lora(lora, cfg))
    return _FACTORIES[cfg.name](cfg, meta, dtype, kernels)
  except AttributeError as e:  # ConfigDict: a field this model needs is not declared.
    field = str(e).splitlines()[0].strip('"\'')
    raise ConfigError(f"model.{field}: model.name={cfg.name} needs this field; the experiment's "
                     'model section does not declare it') from None


def _check_sizes(cfg: ml_collections.ConfigDict) -> None:
  """Widths must be positive and dropout a probability, whichever model declares them."""
  for field in ('features', 'widths', 'hidden', 'width', 'depth', 'heads', 'max_len', 'latent',
                'mlp_ratio'):
    if field in cfg:
      values = cfg[field] if isinstance(cfg[field], (tuple, list)) else (cfg[field],)
      if not values or any(v <= 0 for v in values):
        raise ConfigError(f'model.{field} must be positive, got {cfg[field]}')
  if 'dropout' in cfg and not 0.0 <= cfg.dropout < 1.0:
    raise ConfigError(f'model.dropout must be in [0, 1), got {cfg.dropout}')


def has_batch_stats(name: str) -> bool:
  """Whether the model keeps a 'batch_stats' collection (apply it with mutable=...)."""
  _check_name(name)
  return name in _WITH_BATCH_STATS

