#!/usr/bin/env bash
# Set up stroke-ray in ./.venv: idempotent, fast on a re-run.
#
# torch is installed first and on its own, so that pip never resolves the plain `torch`
# requirement to a multi-GB CUDA build on a CPU machine:
#   - a torch already in the venv (CPU or CUDA) is kept;
#   - TORCH_SPEC overrides the choice (e.g. TORCH_SPEC="torch==2.13.0" or a CUDA index via
#     PIP_INDEX_URL/PIP_EXTRA_INDEX_URL);
#   - with an NVIDIA GPU (nvidia-smi present) the default PyPI build, which is CUDA-enabled;
#   - otherwise torch==2.13.0 from PyTorch's CPU wheel index
#     (https://download.pytorch.org/whl/cpu: ~200 MB instead of PyPI's multi-GB CUDA build)
#     when that host resolves; offline, whatever the configured index or local wheels offer.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    "${PIP[@]}" "$TORCH_SPEC"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" torch
  elif getent hosts download.pytorch.org >/dev/null 2>&1; then
    "${PIP[@]}" --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
  else
    "${PIP[@]}" "torch==2.13.0"
  fi
fi
# Re-install only when the project's metadata or the tested versions changed since the last
# set-up. constraints.txt holds the versions the tests ran with (torch excepted, see above).
stamp=.venv/.stroke-ray-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  "${PIP[@]}" -c constraints.txt -e ".[test]"
  touch "$stamp"
fi
.venv/bin/python -c "import stroke_ray, torch; print(f'stroke-ray {stroke_ray.__version__} ready (torch {torch.__version__}, CUDA {torch.cuda.is_available()})')"
