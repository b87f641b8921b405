"""Measuring a compression: ``ntk-check`` (output and Adam-NTK error per method) and ``bench`` (step time, memory, parameters, FLOPs)."""
