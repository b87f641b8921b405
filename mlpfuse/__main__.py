"""``python -m mlpfuse`` runs the command line."""

from mlpfuse.cli import main

main()
