"""`python -m sparse_rtrl ...` runs the `sparse-rtrl` console script."""

import sys

from .cli import main


sys.exit(main())
