#!/usr/bin/env bash
# Create (or reuse) .venv in the repo and install pathmil into it, torch first and pinned.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again: it only installs what changed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"
quiet_pip() {  # this machine's pip config lists index folders that may be absent; hide that noise only
  "$REPO/.venv/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
want="$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -c1-16)"
have="$(cat .venv/.pathmil-installed 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
  echo "setup: installing torch, then pathmil (first run takes a few minutes)" >&2
  quiet_pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
  quiet_pip install -q --disable-pip-version-check -c scripts/constraints.txt -e ".[test]"
  echo "$want" > .venv/.pathmil-installed
fi
export PATHMIL_CACHE="${PATHMIL_CACHE:-$REPO/.cache}"
export PATH="$REPO/.venv/bin:$PATH"
