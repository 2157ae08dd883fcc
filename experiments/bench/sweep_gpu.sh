#!/usr/bin/env bash
# The GPU sweep benchmark on a bare GPU machine (experiments/bench/sweep_gpu.py does the work).
#
#   experiments/bench/sweep_gpu.sh fetch            # where PyPI is reachable: the few pure-Python
#                                                   # wheels a stock PyTorch image lacks -> outputs/wheels
#   experiments/bench/sweep_gpu.sh [sweep_gpu.py options]   # on the GPU machine
#
# Why: a GPU image usually has torch, lightning, timm, torchmetrics, scikit-image, pandas and
# matplotlib, but not Hydra, OmegaConf, the joblib launcher, grad-cam or pydicom, and it may have no
# network. The wheels (~3 MB) travel with the checkout (outputs/ is git-ignored: name it in the
# device tool's `carry`), are installed into /tmp/site, and the checkout itself goes on PYTHONPATH
# (no pip install -e needed). With a project venv (.venv) present, that is used instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=outputs/wheels

if [[ "${1:-}" == "fetch" ]]; then
  mkdir -p "$WHEELS"
  PIP="python3 -m pip"
  [[ -x .venv/bin/pip ]] && PIP=.venv/bin/pip
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" hydra-core==1.3.8 omegaconf==2.3.1 hydra-joblib-launcher==1.2.0 ttach==0.0.3 pydicom==3.0.2
  # These two publish source archives only: build pure-Python wheels here.
  $PIP wheel -q --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3 grad-cam==1.5.7
  ls -l "$WHEELS"
  exit 0
fi

export PYTHONUNBUFFERED=1
PY=python3
if [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
elif ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec "$PY" experiments/bench/sweep_gpu.py "$@"
