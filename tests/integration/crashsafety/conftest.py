"""Fixtures of the crash-safety tests (defined in crash_helpers)."""

from crash_helpers import crash_build, start_patient  # noqa: F401
