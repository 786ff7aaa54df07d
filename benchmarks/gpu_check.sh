#!/usr/bin/env bash
# The GPU check: one run of at most ~8 minutes on a lent H200 (issue 19). Usage: benchmarks/gpu_check.sh OUT
#
# The GPU machine has Python 3.12, torch (CUDA), transformers, einops, jaxtyping and tqdm, reaches no package
# registry, and takes at most 64 MiB of ignored files with the tree. So the few missing pure-Python wheels are
# downloaded HERE first (PyPI is reachable from the CPU machine), into the gitignored benchmarks/gpu_wheels/:
#
#   pip download --no-deps --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: \
#       -d benchmarks/gpu_wheels transformer-lens==3.9.0 better-abc plotly pytest pluggy iniconfig
#
# (about 12 MB) and carried with the run: run(command="benchmarks/gpu_check.sh $OUT", carry=["benchmarks/gpu_wheels"]).
# transformer-lens 3.9's import-time-only dependencies datasets and pandas (with pyarrow, 70+ MB) are replaced by
# the stand-ins in benchmarks/gpu_stubs where missing. Rehearse on CPU: DEVICE=cpu SMALL=1 benchmarks/gpu_check.sh OUT
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu_check.sh OUT}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
echo "=== $(date -u) on $(hostname); device $DEVICE"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

if [ -d benchmarks/gpu_wheels ]; then
  echo "=== installing the carried wheels"
  python -m pip install -q --no-index --no-deps benchmarks/gpu_wheels/*.whl || echo "wheel install failed"
fi
STUBS=$(mktemp -d)
for module in datasets pandas; do
  python -c "import $module" 2>/dev/null || ln -s "$PWD/benchmarks/gpu_stubs/$module" "$STUBS/$module"
done
export PYTHONPATH="$PWD:$STUBS${PYTHONPATH:+:$PYTHONPATH}"
python -c "import transformer_lens, tl_edgeprune; print('transformer-lens', transformer_lens.__version__ if hasattr(transformer_lens, '__version__') else '?', 'tl_edgeprune ok')"

echo "=== the engine's tests on $DEVICE (pytest --device)"
timeout 180 python -m pytest -q --device "$DEVICE" -p no:cacheprovider \
  tests/test_engine_exact.py tests/test_edge_pruning.py tests/test_methods.py tests/test_device.py \
  --junitxml="$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1
echo "pytest exit $? (tail below; all of it in $OUT/pytest.log)"
tail -15 "$OUT/pytest.log"

echo "=== measurements (benchmarks/gpu_check.py)"
timeout 300 python benchmarks/gpu_check.py --device "$DEVICE" --out "$OUT" ${SMALL:+--small}
echo "gpu_check.py exit $?"
echo "=== done $(date -u)"
