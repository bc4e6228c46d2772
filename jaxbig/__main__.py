"""`python -m jaxbig` is the `jaxbig` command."""

import os
import sys

# `python -m` put the current folder first on sys.path. jaxbig itself is imported by now;
# nothing else may come from that folder (an `optax.py` there would shadow the real one).
if not sys.flags.safe_path and sys.path and sys.path[0] in ('', os.getcwd()):
  del sys.path[0]

from jaxbig.cli import main  # pylint: disable=g-import-not-at-top

if __name__ == '__main__':  # Not when a worker process (spawn) imports this module again.
  sys.exit(main())
