#!/usr/bin/env bash
# Install the peer libraries for benchmarks/peers into the active virtual environment, keeping its torch.
# kronfluence requires torchvision, and PyPI's torchvision wheels pin a newer torch (a multi-GB CUDA build here);
# kronfluence's influence code does not import torchvision, so it goes in with --no-deps after its other deps.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m pip install -e ".[peers]"
python -m pip install --no-deps "kronfluence>=1.0"
python -c "import captum, dattri, kronfluence, torch; print('peers ready; torch', torch.__version__)"
