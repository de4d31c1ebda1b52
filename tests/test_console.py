"""The console: expected library messages dropped (only those), log levels per process, the CPUs we may use."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import transformers

from phi3v import console
from phi3v.console import (
    EXPECTED_LOG_RECORDS,
    EXPECTED_WARNINGS,
    available_cpus,
    quiet_expected_messages,
    setup_logging,
)


class Kept(logging.Handler):
    """The records that reach a handler on the logger itself (libraries may stop propagation to the root)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def kept_on():
    attached = []

    def attach(name: str) -> Kept:
        logger = logging.getLogger(name)
        handler = Kept()
        attached.append((logger, handler, logger.level))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        return handler

    yield attach
    for logger, handler, level in attached:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("name, message", EXPECTED_LOG_RECORDS, ids=[name for name, _ in EXPECTED_LOG_RECORDS])
def test_each_expected_record_is_dropped_and_nothing_else(name, message, kept_on):
    """The filters are installed by ``import phi3v``, for loggers the libraries create later too."""
    kept = kept_on(name)
    logger = logging.getLogger(name)
    logger.warning(f"{message}: the detail that follows")
    logger.warning(f"[RANK 0] {message}")  # some loggers prefix the rank
    logger.warning("Something else went wrong")
    logger.warning(message[: len(message) // 2])  # only the start of the listed message is not it
    assert kept.messages == ["Something else went wrong", message[: len(message) // 2]]


def test_a_listed_message_on_another_logger_stays_visible(kept_on):
    name, message = EXPECTED_LOG_RECORDS[0]
    kept = kept_on("phi3v.tests.elsewhere")
    logging.getLogger("phi3v.tests.elsewhere").warning(message)
    assert kept.messages == [message]


def test_a_logger_created_after_the_filters_gets_them(monkeypatch, kept_on):
    monkeypatch.setattr(console, "EXPECTED_LOG_RECORDS", (("phi3v.tests.future_library", "Expected noise"),))
    monkeypatch.setattr(console, "EXPECTED_WARNINGS", ())
    quiet_expected_messages()
    kept = kept_on("phi3v.tests.future_library")
    logging.getLogger("phi3v.tests.future_library").info("Expected noise, %d times", 3)
    logging.getLogger("phi3v.tests.future_library").info("A real problem, %d times", 3)
    assert kept.messages == ["A real problem, 3 times"]


WARNING_EXAMPLES = {
    "Setting `save_embedding_layers` to `True`": "Setting `save_embedding_layers` to `True` as embedding layers found",
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated": (
        "`torch.distributed.all_gather_into_tensor` is deprecated, use `all_gather` instead"
    ),
    "`is_gradient_checkpointing` is deprecated": "`is_gradient_checkpointing` is deprecated, use the new name",
}


def test_each_expected_warning_is_dropped_and_others_stay():
    assert {message for _, message in EXPECTED_WARNINGS} == set(WARNING_EXAMPLES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_expected_messages()
        for category, pattern in EXPECTED_WARNINGS:
            warnings.warn(WARNING_EXAMPLES[pattern], category, stacklevel=1)
            warnings.warn(f"Unrelated: {WARNING_EXAMPLES[pattern]}", category, stacklevel=1)  # not at the start
            other = RuntimeWarning if category is not RuntimeWarning else UserWarning
            warnings.warn(WARNING_EXAMPLES[pattern], other, stacklevel=1)  # another category
        warnings.warn("`torch.distributed.all_reduce_coalesced` is deprecated", FutureWarning, stacklevel=1)
    seen = [(w.category, str(w.message)) for w in caught]
    expected = []
    for category, pattern in EXPECTED_WARNINGS:
        other = RuntimeWarning if category is not RuntimeWarning else UserWarning
        expected += [(category, f"Unrelated: {WARNING_EXAMPLES[pattern]}"), (other, WARNING_EXAMPLES[pattern])]
    expected.append((FutureWarning, "`torch.distributed.all_reduce_coalesced` is deprecated"))
    assert seen == expected


@pytest.fixture
def restored_levels(monkeypatch):
    calls = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: calls.append(kwargs))
    phi3v_level = logging.getLogger("phi3v").level
    verbosity = transformers.utils.logging.get_verbosity()
    yield calls
    logging.getLogger("phi3v").setLevel(phi3v_level)
    transformers.utils.logging.set_verbosity(verbosity)


def test_the_main_process_logs_info_and_library_warnings(restored_levels):
    setup_logging(is_main_process=True)
    assert [call["level"] for call in restored_levels] == [logging.INFO]
    assert "%(asctime)s" in restored_levels[0]["format"] and "%(name)s" in restored_levels[0]["format"]
    assert logging.getLogger("phi3v").level == logging.INFO
    assert transformers.utils.logging.get_verbosity() == transformers.logging.WARNING


def test_other_processes_log_warnings_and_library_errors_only(restored_levels):
    setup_logging(is_main_process=False)
    assert [call["level"] for call in restored_levels] == [logging.WARNING]
    assert logging.getLogger("phi3v").level == logging.WARNING
    assert transformers.utils.logging.get_verbosity() == transformers.logging.ERROR


def test_available_cpus_is_what_this_process_may_run_on():
    cpus = available_cpus()
    assert 1 <= cpus <= os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        assert cpus == len(os.sched_getaffinity(0))


def test_available_cpus_without_affinity(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert available_cpus() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # undeterminable
    assert available_cpus() == 1
