"""``python -m netfold.cli ARGS``: the ``netfold`` command."""

import sys

from . import main

sys.exit(main())
