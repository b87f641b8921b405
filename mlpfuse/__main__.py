"""``python -m mlpfuse`` runs the command line."""

from .cli import main

main()
