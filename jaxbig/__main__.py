"""`python -m jaxbig` is the `jaxbig` command."""

import sys

from jaxbig.cli import main

sys.exit(main())
