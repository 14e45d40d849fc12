"""Fault suite: every scenario counts, per sink, occurrences required vs received and asserts
lost = 0 (see docs/reliability.md). The scenarios live in reliability_scenarios.py so that
bench/reliability.py runs the same code with longer durations."""

from __future__ import annotations

import sys
from pathlib import Path

# The helpers are plain modules next to this file (tests/ is not a package).
sys.path.insert(0, str(Path(__file__).parent))
