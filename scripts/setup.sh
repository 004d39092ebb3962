#!/usr/bin/env bash
# Create .venv and install abliterate with its test extras.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126").
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
# benchmark: lm-eval (abliterate benchmark and its test); about 30 s more
.venv/bin/python -m pip install -q -e ".[test,plots,adapter,benchmark]"
echo "setup: $(.venv/bin/python -c 'import torch, lightning, transformers, optuna; print("torch", torch.__version__, "lightning", lightning.__version__, "transformers", transformers.__version__, "optuna", optuna.__version__)')"
