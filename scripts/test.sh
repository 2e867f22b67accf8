#!/usr/bin/env bash
# The README's test command: installs bertforge with its test extras (torch pinned by constraints.txt)
# and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c constraints.txt -e '.[dev]'
python -m pytest tests "$@"
