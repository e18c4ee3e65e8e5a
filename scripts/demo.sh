#!/usr/bin/env bash
# The main job on its embedded default: synthetic cohort + a real slide -> tile store, table, pictures.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python "$REPO/scripts/demo.py" "$@"
