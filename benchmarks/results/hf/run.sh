#!/usr/bin/env bash
# Import and export of a random 1.10B-parameter Llama-style model (float32, 17 shards):
# wall time and peak resident memory of each command. Needs ~15 GB of free disk in $TMP.
set -euo pipefail
T=${TMP:-/tmp}/jaxbig-hf-bench
rm -rf "$T" && mkdir -p "$T"
export JAX_PLATFORMS=cpu
python "$(dirname "$0")/../../make_hf_llama.py" "$T/llama1b"
du -sb "$T/llama1b"
/usr/bin/time -f "import-hf: %e s, peak RSS %M KB" jaxbig import-hf "$T/llama1b" --workdir "$T/imported" >/dev/null
/usr/bin/time -f "export-hf: %e s, peak RSS %M KB" jaxbig export-hf "$T/imported" --out "$T/exported" >/dev/null
python - "$T" <<'PY'
import json, sys
import numpy as np
from safetensors import safe_open
t = sys.argv[1]
src = json.load(open(f'{t}/llama1b/model.safetensors.index.json'))['weight_map']
dst = json.load(open(f'{t}/exported/model.safetensors.index.json'))['weight_map']
assert sorted(src) == sorted(dst)
for k in src:
  with safe_open(f'{t}/llama1b/{src[k]}', 'numpy') as a, safe_open(f'{t}/exported/{dst[k]}', 'numpy') as b:
    assert np.array_equal(a.get_tensor(k), b.get_tensor(k)), k
print(f'round trip: {len(src)} tensors bit-identical')
PY
rm -rf "$T"
