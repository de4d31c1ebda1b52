"""A quiet, honest console: messages every run prints for conditions that are expected here are dropped,
or said once in our own words; every other warning stays visible.

Each entry names the library's logger (or warning) and the start of the message, and why it is expected.
"""

from __future__ import annotations

import logging
import os
import warnings

import transformers

# (logger name, message): logged by libraries for conditions the recipes expect.
EXPECTED_LOG_RECORDS = (
    # bitsandbytes looks for an optional faster CPU kernel package at import; GPUs never use it.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    # DeepSpeed and torch on a machine without a GPU: the recipe says "No GPU: ... fp32 on the CPU" itself.
    ("DeepSpeed", "Setting accelerator to CPU"),
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
    # The Trainer hands DeepSpeed the accumulation steps through the DeepSpeed config, as it should.
    ("accelerate.accelerator", "Gradient accumulation steps mismatch"),
)

# (category, message regex): Python warnings for expected conditions.
EXPECTED_WARNINGS = (
    # lm_head is a LoRA target in the original recipe, so PEFT saves the embedding layers (docs/training.md, LoRA).
    (UserWarning, "Setting `save_embedding_layers` to `True`"),
    # DeepSpeed ZeRO-3 calls collectives torch renamed; one warning per call would flood the log.
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    # PEFT and the Trainer still ask with the old name for gradient checkpointing.
    (FutureWarning, "`is_gradient_checkpointing` is deprecated"),
)


class _DropExpected(logging.Filter):
    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return self.message not in str(record.msg)  # some loggers prefix the rank: "[RANK 0] ..."


def quiet_expected_messages() -> None:
    """Install the filters (loggers that do not exist yet get them when their library creates them)."""
    for name, message in EXPECTED_LOG_RECORDS:
        logging.getLogger(name).addFilter(_DropExpected(message))
    for category, message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def setup_logging(is_main_process: bool) -> None:
    level = logging.INFO if is_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    logging.getLogger("phi3v").setLevel(level)
    transformers.utils.logging.set_verbosity(
        transformers.logging.WARNING if is_main_process else transformers.logging.ERROR
    )
