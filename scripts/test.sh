#!/usr/bin/env bash
# The test command: set up .venv if needed, fetch the real sample slide once, run the suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -c "from wsi.samples import fetch_sample; fetch_sample('cmu_small_region.svs')"
# the slowest tests are listed at the end, so a slow one is seen the day it lands
exec python -m pytest -q --durations=15 --durations-min=2 "$@"
