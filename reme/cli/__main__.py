"""``python -m reme.cli``: the same as the ``reme`` command."""

from reme.cli import main

main()
