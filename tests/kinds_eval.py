"""Evaluate the ``kinds`` cell's model (as built, untrained) on its validation set with
``trainer.evaluate``, on however many processes this script is launched with:
``python tests/kinds_eval.py CONFIG.yaml output_dir=DIR``. Writes DIR/eval.json and DIR/run.json
(the world size the process group really had), from rank 0."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # byo_models, next to this script

import dist_mtl  # noqa: E402
from byo_models import CELLS  # noqa: E402
from dist_mtl.data import python_data  # noqa: E402
from dist_mtl.distributed import Distributed  # noqa: E402
from dist_mtl.trainer import evaluate  # noqa: E402

if __name__ == "__main__":
    config, *overrides = sys.argv[1:]
    cfg = dist_mtl.load_config(config, overrides)
    cell = CELLS["kinds"](cfg)
    dist = Distributed.create()
    data = python_data(cell["tasks"], cell["train_data"], cell["val_data"])
    metrics = evaluate(dist, cell["model"], data, batch_size=3)  # odd: ranks get unequal shares
    if dist.is_main:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(metrics))
        (out / "run.json").write_text(json.dumps({"world_size": dist.world_size}))
    dist.barrier()
