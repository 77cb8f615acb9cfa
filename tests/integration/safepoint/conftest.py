"""Fixtures of the safe-moment tests: the apply tests' helpers (real patches, real patients)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apply"))

from apply_helpers import start  # noqa: E402, F401
