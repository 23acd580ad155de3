#!/usr/bin/env bash
# ESD's loop at real size on one CUDA GPU: reference vs fast mode, esd-x and esd-u, on an SD 1.5-size UNet
# (860M parameters, 64x64 latents) and an SDXL-size one (2.6B parameters, 128x128 latents, both text encoders'
# widths), random weights made on the GPU; fast mode in bf16 autocast. Prints one table: median s/iteration,
# speed-up, peak GPU memory. Meant to fit 8 minutes on one H100/H200-class GPU (SD 1.5 and mid alone, 20
# iterations each: 383 s on an H200; the SDXL rows have not run on a GPU yet).
#   bench/gpu.sh                 with the project's environment (`make TORCH_SPEC=torch install`, then .venv)
#   PYTHON=python3 bench/gpu.sh  with any Python that has torch (CUDA), diffusers, transformers, typer and rich
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA GPU here')"
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"
exec "$PY" -m esd.cli bench speed --configs sd15,sdxl --sd15-iterations 10 --sdxl-iterations 4 --no-erasure "$@"
