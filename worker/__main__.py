"""``python -m worker`` is the ``dms-worker`` command."""
import sys

from .cli import main

sys.exit(main())
