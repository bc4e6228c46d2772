"""Tokenizers by name: `bytes` (UTF-8 bytes, ids 0-255, end of document 256), an HF
`tokenizers` file (`tokenizer.json`) or a SentencePiece model (`.model`).

Every tokenizer gives `encode(text) -> int array`, `decode(ids) -> str`, its vocabulary size,
the id that ends a document, and an identity (the SHA-256 of its file) that prepared shards
and runs record, so tokens are never read with another tokenizer than the one that made them.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from jaxbig.config import ConfigError

BYTES = 'bytes'
# End-of-document tokens looked for in an HF tokenizer's vocabulary, in this order.
EOS_NAMES = ('<|endoftext|>', '</s>', '<eos>', '<|end_of_text|>', '[SEP]')
MAX_VOCAB = 2**31  # Token ids are stored and fed as int32 at most.


def padded_vocab(n: int, multiple: int = 128) -> int:
  """`n` rounded up to a multiple of `multiple`: embedding and logits rows in whole tiles."""
  return -(-n // multiple) * multiple


class Bytes:
  """UTF-8 bytes; 256 ends a document."""
  vocab_size = 257
  eos_id = 256
  identity = BYTES
  path = ''

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode('utf-8', errors='replace')


class HuggingFace:
  """A `tokenizers` file, e.g. one written by `jaxbig tokenizer train`."""

  def __init__(self, path: str, data: bytes):
    import tokenizers  # Only runs that name such a file need it.
    try:
      self._tok = tokenizers.Tokenizer.from_str(data.decode('utf-8'))
    except Exception as e:  # The library raises its own exception types for bad files.
      raise ConfigError(f'{path}: not a tokenizers file ({type(e).__name__})') from None
    self.path = path
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    ids = [self._tok.token_to_id(t) for t in EOS_NAMES]
    ids = [i for i in ids if i is not None]
    if not ids:
      raise ConfigError(f'{path}: has no end-of-document token (one of {", ".join(EOS_NAMES)})')
    self.eos_id = ids[0]
    self.identity = hashlib.sha256(data).hexdigest()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


class SentencePiece:
  """A SentencePiece `.model` file."""

  def __init__(self, path: str, data: bytes):
    import sentencepiece  # Only runs that name such a file need it.
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(data)
    except Exception as e:  # RuntimeError or a protobuf error, by version.
      raise ConfigError(f'{path}: not a SentencePiece model ({type(e).__name__})') from None
    self.path = path
    self.vocab_size = self._sp.GetPieceSize()
    self.eos_id = self._sp.eos_id()
    if self.eos_id < 0:
      raise ConfigError(f'{path}: has no end-of-document token (eos_id is unset)')
    self.identity = hashlib.sha256(data).hexdigest()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.EncodeAsIds(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


MAX_FILE_BYTES = 1 << 30  # A tokenizer file larger than this is not one.


def load(spec: str, field: str = 'data.tokenizer'):
  """The tokenizer `spec` names: 'bytes', or a path to a tokenizers .json or a SentencePiece
  .model file. Raises ConfigError naming `field` or the file."""
  if spec in ('', BYTES):
    return Bytes()
  if not os.path.isfile(spec):
    raise ConfigError(f"{field}: not found or not a regular file: {spec} (give 'bytes', a "
                      'tokenizer.json or a SentencePiece .model)')
  if os.path.getsize(spec) > MAX_FILE_BYTES:
    raise ConfigError(f'{spec}: larger than {MAX_FILE_BYTES >> 20} MiB; not a tokenizer file')
  with open(spec, 'rb') as f:
    data = f.read()
  if spec.endswith('.json'):
    tok = HuggingFace(spec, data)
  elif spec.endswith('.model'):
    tok = SentencePiece(spec, data)
  else:
    raise ConfigError(f'{field}: {spec}: name a tokenizers .json or a SentencePiece .model')
  if tok.vocab_size >= MAX_VOCAB:
    raise ConfigError(f'{spec}: a vocabulary of {tok.vocab_size} is over 2^31 ids')
  return tok


def train_bpe(source: str, vocab_size: int, out: str, *, pattern: str = '', field: str = 'text',
              val_fraction: float = 0.05, test_fraction: float = 0.05) -> dict:
  """Trains a byte-level BPE (HF `tokenizers`) on the training split of `source` (the split
  `jaxbig prepare text` gives with the same fractions, so val and test stay unseen) and
  writes it to `out`, which must not exist. Returns facts about it."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from jaxbig.data import prepare  # Circular otherwise.
  if os.path.exists(out):
    raise ConfigError(f'--out: {out} exists; give a new file name')
  if not out.endswith('.json'):
    raise ConfigError(f'--out: {out}: a tokenizers file ends in .json')
  if not os.path.isdir(os.path.dirname(out) or '.'):
    raise ConfigError(f'--out: the folder of {out} does not exist')
  if not 256 + 1 < vocab_size < MAX_VOCAB:
    raise ConfigError(f'--vocab must be in 258..{MAX_VOCAB - 1}, got {vocab_size}')
  if not os.path.exists(source):
    raise ConfigError(f'SOURCE: not found: {source}')
  stats = {'documents': 0, 'bytes': 0}

  def train_texts():  # Streamed: the corpus is never held whole.
    for split, _, doc, _ in prepare.documents(source, pattern, field, val_fraction,
                                              test_fraction):
      if split == 'train':
        stats['documents'] += 1
        stats['bytes'] += len(doc.encode('utf-8'))
        yield doc

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_NAMES[0]],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=True)
  tok.train_from_iterator(train_texts(), trainer=trainer)
  if not stats['documents']:
    raise ConfigError(f'{source}: no training document to learn a vocabulary from')
  tmp = out + '.partial'
  tok.save(tmp)
  os.replace(tmp, out)
  return {'out': out, 'vocab_size': tok.get_vocab_size(), **stats}
