"""``python -m fastif.cli``: the same as the ``fastif`` command."""

from . import main

main()
