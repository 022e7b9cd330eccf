"""`python -m medseg` is the same as the `medseg` command (torchrun uses this form)."""

import sys

from medseg.cli import main

sys.exit(main())
