#!/usr/bin/env bash
# The GPU numbers of issue 14 in one prepared run on one H100/H200 (under ~8 minutes): memory bandwidth, the wire
# codec on the device, attention at the 10B preset's shape per implementation, and the 1B preset's tokens/s, MFU
# and peak memory. Writes the "GPU (benchmarks/gpu.sh)" section of benchmarks/RESULTS.md, and the table plus raw
# rows under $OUT when that is set. Extra arguments go to benchmarks/gpu.py (see its --help).
#
# On a machine without Grain (the project's one dependency a bare CUDA image may lack), put its wheels in .whl/
# (grain, array_record, portpicker) and they are installed to /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ! python3 -c "import grain" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
exec python3 benchmarks/gpu.py ${OUT:+--out "$OUT"} "$@"
