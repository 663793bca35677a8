"""`python -m client IMAGE...`: the same as the `ics` console script."""

import sys

from client.cli import main

sys.exit(main())
