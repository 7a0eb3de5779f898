"""``python -m worker`` is the ``dms-worker`` command."""
import os
import sys

# `python -m` puts the working directory first on sys.path, where a stray file (say a CSV
# export named like a module) would shadow installed code. Move it last, as `dms-worker run`
# has it (worker.executor.resolve_handler), so both commands import handlers alike.
if sys.path and os.path.realpath(sys.path[0] or ".") == os.path.realpath(os.getcwd()):
    sys.path.append(sys.path.pop(0))

from .cli import main  # noqa: E402

sys.exit(main())
