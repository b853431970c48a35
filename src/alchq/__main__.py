"""``python -m alchq`` is the ``alchq`` command."""

import sys

from alchq.cli import main

sys.exit(main())
