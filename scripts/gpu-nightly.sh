#!/usr/bin/env bash
# The nightly GPU battery: every built-in primitive, every check, all devices,
# the nightly hypothesis profile.  Run it by hand on any GPU machine:
#
#   pip install -U "jax[cuda12]" && pip install -e ".[test]"
#   scripts/gpu-nightly.sh [REPORT_PATH]
#
# It fails when no GPU is visible (set ALLOW_NO_GPU=1 to run on CPU anyway).
set -euo pipefail
cd "$(dirname "$0")/.."
report="${1:-${ETP_REPORT:-etp-report.json}}"
python - <<'PY'
import os, sys
import jax
print('jax', jax.__version__, 'devices:', jax.devices())
if not any(d.platform == 'gpu' for d in jax.devices()):
    msg = 'no GPU visible to JAX'
    if os.environ.get('ALLOW_NO_GPU') == '1':
        print(msg + ' (ALLOW_NO_GPU=1: running on CPU)')
    else:
        sys.exit(msg + '; install jax with CUDA, or set ALLOW_NO_GPU=1')
PY
pytest --etp-check --etp-devices=all --hypothesis-profile=nightly \
  --etp-report="$report"
