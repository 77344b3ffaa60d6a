"""`python -m argen` runs the command line."""

import sys

from argen.cli import main

sys.exit(main())
