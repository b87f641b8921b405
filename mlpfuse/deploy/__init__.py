"""Leaving mlpfuse: ``export`` to the plain base architecture or to GGUF, and what each runtime can load (``inspect``)."""
