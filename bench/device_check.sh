#!/usr/bin/env bash
# The accelerator check, in one short run on a fresh GPU machine (under 8 minutes):
#   bash bench/device_check.sh
# 1. Python: the machine's own python3 when its JAX already sees a GPU (offline images that ship JAX);
#    otherwise a fresh venv with the CUDA build of JAX and the project's requirements.
#    Pure-Python wheels placed in .whl/ (e.g. ml-collections for an offline machine) are installed first.
# 2. SigLIP B/16 at 224 px, 64 tokens, bfloat16, at the batch that fills the device (bench/train_step.py
#    --batch fill): step time, examples/s, MFU against the vendor peak table, and which attention kernel
#    the compiled step runs (cuDNN fused attention where the device supports it, XLA's elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
export PYTHONUNBUFFERED=1

has_gpu_jax() { "$1" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; }

PYTHON=python3
if ! has_gpu_jax "$PYTHON"; then
  venv=${SIGLIP_DEVICE_VENV:-/tmp/siglip_device_venv}
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r requirements.txt "jax[cuda12]"
  PYTHON="$venv/bin/python"
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/siglip_site .whl/*.whl
  export PYTHONPATH=/tmp/siglip_site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
echo "set-up: $((SECONDS - started)) s"

timeout 420 "$PYTHON" bench/train_step.py --variant B/16 --dtype bfloat16 --batch fill --steps 10
echo "device check: $((SECONDS - started)) s in all"
