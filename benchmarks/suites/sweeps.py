"""How step time grows with batch, width and sequence length (fp32, the seed models).

    jaxbig bench benchmarks/suites/sweeps.py --out benchmarks/results/<device>-sweeps
    jaxbig report benchmarks/results/<device>-sweeps

`jaxbig report` fits the growth exponent of each sweep (the slope of step time on log-log
axes) and plots it. Rows: the seed CNN over batch; the byte LSTM over batch and hidden
width; the byte GPT over batch, width (3 heads, so 32 to 128 features per head) and
sequence length (max_len 512 in every length row, so that only the length changes).
"""

SETTINGS = {'min_seconds': 2.0}


def rows() -> list[dict]:
  cnn, lstm, gpt = ('experiments/cnn_digits.py', 'experiments/lstm_stdlib.py',
                    'experiments/gpt_stdlib.py')
  out = [{'name': f'cnn-b{b}', 'experiment': cnn, 'batch': b} for b in (32, 64, 128, 256)]
  out += [{'name': f'lstm-b{b}', 'experiment': lstm, 'batch': b} for b in (8, 16, 32, 64)]
  out += [{'name': f'lstm-h{h}', 'experiment': lstm, 'overrides': [f'model.hidden={h}']}
          for h in (128, 256, 512)]
  out += [{'name': f'gpt-b{b}', 'experiment': gpt, 'batch': b} for b in (8, 16, 32, 64)]
  out += [{'name': f'gpt-w{w}', 'experiment': gpt, 'overrides': [f'model.width={w}']}
          for w in (96, 192, 384)]
  out += [{'name': f'gpt-l{n}', 'experiment': gpt,
           'overrides': ['model.max_len=512', f'data.seq_len={n}']} for n in (64, 128, 256, 512)]
  return out
