#!/usr/bin/env bash
# The accelerator check, in one short run on a fresh GPU machine (under 8 minutes):
#   bash bench/device_check.sh
# 1. Python: $PYTHON if set, else the machine's own python3 when its JAX already sees a GPU (offline
#    images that ship JAX); otherwise a fresh venv with `pip install -U "jax[cuda12]"` and the project's
#    requirements (needs the package index). Pure-Python wheels placed in .whl/ (e.g. ml-collections for
#    an offline machine) are installed first.
# 2. SigLIP B/16 at 224 px, 64 tokens, bfloat16, at the batch that fills the device (bench/train_step.py
#    --batch fill; a fixed batch of 256 if that fails): step time, examples/s, MFU against the vendor peak
#    table, and which attention kernel the compiled step runs. A GPU given bf16 must run cuDNN's fused
#    attention (the HLO has the __cudnn$fmha custom call), else the check fails (exit 3); elsewhere XLA's
#    attention is the expected, clean fallback.
# Dry run of the Python parts on any CPU machine, tiny shapes, no install, seconds:
#   SIGLIP_DEVICE_DRY_RUN=1 PYTHON=.venv/bin/python bash bench/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
BUDGET=${SIGLIP_DEVICE_BUDGET_S:-470}  # seconds for the whole check; the bench gets what set-up leaves
export PYTHONUNBUFFERED=1

has_gpu_jax() { "$1" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" 2>/dev/null; }

if [[ "${SIGLIP_DEVICE_DRY_RUN:-0}" == 1 ]]; then
  PYTHON=${PYTHON:-python3}
  bench=(--variant mu/16 --image-size 32 --tokens 16 --dtype float32 --steps 2)
  batch=(--batch 8)
  fallback=(--batch 8)
else
  bench=(--variant B/16 --image-size 224 --tokens 64 --dtype bfloat16 --steps 10 --expect-cudnn)
  batch=(--batch fill)
  fallback=(--batch 256)
  if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python3
    if ! has_gpu_jax "$PYTHON"; then
      venv=${SIGLIP_DEVICE_VENV:-/tmp/siglip_device_venv}
      if ! { python3 -m venv "$venv" && "$venv/bin/python" -m pip install -q --upgrade pip &&
             "$venv/bin/python" -m pip install -q -U -r requirements.txt "jax[cuda12]"; }; then
        echo "device check: no GPU JAX on this machine and the install failed (no package index?);" \
             "set PYTHON to an interpreter whose JAX sees the GPU." >&2
        exit 2
      fi
      PYTHON="$venv/bin/python"
    fi
  fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/siglip_site .whl/*.whl
  export PYTHONPATH=/tmp/siglip_site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PYTHON" -c "import sys, jax; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
echo "set-up: $((SECONDS - started)) s"

left=$((BUDGET - (SECONDS - started)))
status=0
timeout "$left" "$PYTHON" bench/train_step.py "${bench[@]}" "${batch[@]}" || status=$?
if [[ $status != 0 ]]; then
  left=$((BUDGET - (SECONDS - started)))
  # 3: the attention check failed, a result in itself; 124: out of time. Otherwise (e.g. the filled
  # batch ran out of memory) one more try at a fixed batch while time is left.
  if [[ $status == 3 || $status == 124 || $left -lt 90 ]]; then
    echo "device check: failed (exit $status) after $((SECONDS - started)) s"
    exit "$status"
  fi
  echo "device check: ${batch[*]} failed (exit $status); retrying with ${fallback[*]}"
  timeout "$left" "$PYTHON" bench/train_step.py "${bench[@]}" "${fallback[@]}"
fi
echo "device check: $((SECONDS - started)) s in all"
