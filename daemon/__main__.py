"""``python -m daemon`` is the same as the ``trigd`` command."""

import sys

from daemon.cli.main import main

sys.exit(main())
