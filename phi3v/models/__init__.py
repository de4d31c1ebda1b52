"""Phi-3.5-vision itself: configuration, model, processor, Liger kernels, the tiny checkpoint.

The layer everything else builds on; it imports nothing from ``phi3v.data`` or ``phi3v.training``.
"""
