"""Fixtures of the validation tests: the real projects and patients of the apply tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apply"))

from apply_helpers import libdemo, nonpie, start  # noqa: E402, F401
