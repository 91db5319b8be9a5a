"""``python -m harness``: runs the command line (:func:`harness.cli.main`) and exits with its status."""

import sys

from harness.cli import main

sys.exit(main())
