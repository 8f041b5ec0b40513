"""A user's training script: ``python tests/byo_fit.py CELL CONFIG.yaml [key=value ...]`` builds the
model, tasks and datasets of ``byo_models.CELLS[CELL]`` and trains them with ``dist_mtl.fit``. Run
it under ``torchrun`` or ``accelerate launch`` as it is (every rank runs the whole script)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # byo_models, next to this script

import dist_mtl  # noqa: E402
from byo_models import CELLS  # noqa: E402

if __name__ == "__main__":
    cell, config, *overrides = sys.argv[1:]
    cfg = dist_mtl.load_config(config, overrides)
    result = dist_mtl.fit(cfg, **CELLS[cell](cfg))
    print(f"fit: {result.steps} steps, final {result.final_eval}")
