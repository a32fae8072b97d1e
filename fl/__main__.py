"""``python -m fl`` runs the ``privagg`` command line."""

import sys

from fl.cli.main import main

sys.exit(main())
