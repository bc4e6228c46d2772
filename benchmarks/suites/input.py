"""Input pipelines alone, beside the train step that consumes them (issue 25).

    (once: the two commands in experiments/gpt_bpe_stdlib.py, which make runs/stdlib-bpe)
    jaxbig bench benchmarks/suites/input.py --out benchmarks/results/<device>/input
    jaxbig report benchmarks/results/<device>/input

Rows: byte windows of the in-memory stdlib text (gpt_stdlib), and windows of the stdlib's
BPE token shards (data.name=tokens, memory-mapped), the latter at the experiment's batch and at a
batch of 64 x 1024 tokens with a one-block model, where the input's rate is the point.
"""

SETTINGS = {'rounds': 1}


def rows() -> list[dict]:
  shards = ['data.path=runs/stdlib-bpe']
  large = ['data.seq_len=1024', 'model.max_len=1024']
  return [
      {'name': 'bytes-in-memory', 'experiment': 'experiments/gpt_stdlib.py', 'input': 200},
      {'name': 'token-shards', 'experiment': 'experiments/gpt_bpe_stdlib.py',
       'overrides': shards, 'input': 200},
      {'name': 'token-shards-64x1024', 'experiment': 'experiments/gpt_bpe_stdlib.py',
       'overrides': shards + large + ['model.width=64', 'model.depth=1', 'model.heads=2'],
       'batch': 64, 'input': 50},
  ]
