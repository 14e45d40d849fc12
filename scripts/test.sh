#!/usr/bin/env bash
# The whole test suite plus the static checks. Run from the repository root inside the venv.
set -euo pipefail
ruff check .
ruff format --check eventrouter sinks tests bench
mypy
# Two conftest.py files (tests/, tests/sinks/): module names from their paths, not both "conftest".
# tests/*_helpers.py are imported by plain name (pytest puts tests/ on sys.path): MYPYPATH says so.
MYPYPATH=tests mypy --explicit-package-bases tests --exclude tests/reliability
mypy tests/reliability
MYPYPATH=tests/reliability mypy bench
lint-imports
pytest -q -p no:cacheprovider "$@"
