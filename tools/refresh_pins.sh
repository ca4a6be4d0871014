#!/usr/bin/env bash
# Refresh requirements/constraints.txt on purpose: resolve the newest test stack the pyproject ranges allow in a
# scratch venv, run the suite on it, and rewrite the pins only if it passes.
#   tools/refresh_pins.sh            # then review `git diff requirements/constraints.txt` and commit
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q --upgrade pip
pip install -q --upgrade -e ".[test,reference]"
python -m pytest -q -m "not slow" -n 2 --dist worksteal
{
  echo "# The test stack CI and the README's test command install (pip install -e \".[test,reference]\" -c requirements/constraints.txt)."
  echo "# Versions known to pass the suite together. Refresh on purpose: tools/refresh_pins.sh (upgrades, runs the suite, rewrites this file)."
  pip freeze --exclude-editable | grep -v "^sd-jax" | sed 's/+cpu$//'
} > requirements/constraints.txt
echo "suite passed on the new stack; requirements/constraints.txt rewritten ($(wc -l < requirements/constraints.txt) lines)"
