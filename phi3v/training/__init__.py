"""The training runtime: the one model loader, preparation (freezing, LoRA, activation checkpointing), the
HF Trainer setup, verified checkpoints, preemption, guards against silent failures, and failing fast.
"""
