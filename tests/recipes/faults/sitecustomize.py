"""Faults injected into the recipe runs some tests start (Python imports this module at start-up when its
folder is on PYTHONPATH). Each is switched on by an environment variable and does nothing otherwise; the
time each fault happens is appended to $PHI3V_FAULT_LOG, so a test can measure how long the run took to
exit after it.

PHI3V_FAULT_DISK_FULL_AT_SAVE=N: the N-th safetensors file this process writes (a LoRA checkpoint's
adapter) fails as on a full disk: half of it is written, then OSError(ENOSPC).
PHI3V_FAULT_HANG_WRITING=SUFFIX: the process hangs for good when torch.save writes a file whose path ends
with SUFFIX (checkpoint-2/rng_state_1.pth: rank 1, writing its part of the second checkpoint).
PHI3V_FAULT_SLOW_PEER_REPORT=SECONDS: a rank other than 0 takes SECONDS to write that it stops because another
process died, as on a loaded machine (torchrun's SIGTERM to it then comes first).
"""

import os
import time


def _log_fault() -> None:
    with open(os.environ["PHI3V_FAULT_LOG"], "a") as log:
        log.write(f"{time.time()}\n")


if os.environ.get("PHI3V_FAULT_DISK_FULL_AT_SAVE"):
    import errno

    import safetensors.torch

    _save_file, _calls = safetensors.torch.save_file, [0]

    def _save_file_until_the_disk_is_full(tensors, filename, metadata=None):
        _calls[0] += 1
        if _calls[0] < int(os.environ["PHI3V_FAULT_DISK_FULL_AT_SAVE"]):
            return _save_file(tensors, filename, metadata=metadata)
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as handle:
            handle.write(data[: len(data) // 2])
        _log_fault()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    safetensors.torch.save_file = _save_file_until_the_disk_is_full

if os.environ.get("PHI3V_FAULT_HANG_WRITING"):
    import torch

    _torch_save = torch.save

    def _save_or_hang(obj, f, *args, **kwargs):
        if str(f).endswith(os.environ["PHI3V_FAULT_HANG_WRITING"]):
            _log_fault()
            while True:
                time.sleep(3600)
        return _torch_save(obj, f, *args, **kwargs)

    torch.save = _save_or_hang

if os.environ.get("PHI3V_FAULT_SLOW_PEER_REPORT") and os.environ.get("RANK", "0") != "0":
    import logging

    _error = logging.Logger.error

    def _slow_peer_report(self, msg, *args, **kwargs):
        if str(msg).startswith("Rank %d stops"):
            time.sleep(float(os.environ["PHI3V_FAULT_SLOW_PEER_REPORT"]))
        return _error(self, msg, *args, **kwargs)

    logging.Logger.error = _slow_peer_report
