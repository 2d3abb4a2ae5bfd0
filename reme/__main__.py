"""``python -m reme``: the same as the ``reme`` command."""

from reme.cli import main

main()
