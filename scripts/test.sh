#!/usr/bin/env bash
# The test command: set up .venv if needed, fetch the real sample slide once, run the suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -c "from wsi.samples import fetch_sample; fetch_sample('cmu_small_region.svs')"
exec python -m pytest -q "$@"
