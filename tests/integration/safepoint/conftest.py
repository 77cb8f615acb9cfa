"""Fixtures of the safe-moment tests: the apply tests' helpers (real patches, real patients) and polling."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apply"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "process"))     # waiting.py

from apply_helpers import start  # noqa: E402, F401
