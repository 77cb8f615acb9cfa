"""Settings for every test: the engine's audit log goes to the session's temporary directory,
and SIGINT behaves as it does under a terminal.

As root the engine appends one line per patch and unpatch to ``/var/log/libcare/audit.jsonl``;
tests should not fill the machine's log. ``LIBCARE_AUDIT_LOG`` moves the default for this
process and every ``libcare-ctl`` it starts. Tests that check the log pass their own
``--audit-log`` / ``audit_log``.
"""

from __future__ import annotations

import os
import signal

import pytest

AUDIT_LOG_ENV = "LIBCARE_AUDIT_LOG"

# A shell starts background jobs (``make test &``) with SIGINT ignored, and an ignored signal
# stays ignored in every program they start: the tests that press ^C on libcare-patch-make
# or on the fleet would then wait for nothing. Python's own handler is reset to the default
# in each program the tests start.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def session_audit_log(tmp_path_factory):
    """The audit log of tests that do not choose their own (unless the caller set one)."""
    if os.environ.get(AUDIT_LOG_ENV):
        yield os.environ[AUDIT_LOG_ENV]
        return
    path = str(tmp_path_factory.mktemp("audit") / "audit.jsonl")
    os.environ[AUDIT_LOG_ENV] = path
    try:
        yield path
    finally:
        os.environ.pop(AUDIT_LOG_ENV, None)
