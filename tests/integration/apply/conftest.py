"""Fixtures of the apply integration tests (defined in apply_helpers)."""

from apply_helpers import level_store, libdemo, nonpie, start, threads_project  # noqa: F401
