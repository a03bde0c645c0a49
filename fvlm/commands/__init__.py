"""Subcommands of the ``fvlm`` command line that need more than a few lines (``fvlm run``, ...)."""
