"""Train your own model, tasks and data with the Python API: ``dist_mtl.fit``.

    python examples/custom_model.py                                    # 1 process
    python examples/custom_model.py train.max_steps=200 output_dir=runs/examples/long
    torchrun --nproc_per_node 2 examples/custom_model.py               # 2 processes, same result
    accelerate launch --config_file launch/cpu.yaml --num_processes 2 examples/custom_model.py

Every process runs this whole script: each builds the same data and the same model, and ``fit``
forms the process group, splits every global batch across the processes and keeps them in step.
The model, the loss and the dataset are in ``my_model.py``; ``examples/custom.yaml`` is the same
run through class paths (``dist-mtl train examples/custom.yaml``), to the last bit.
"""

import os
import sys

import torch
from torch import nn

import dist_mtl
from my_model import Diamonds, PriceHead, TabularEncoder, log_cosh

# The training knobs; anything on the command line (key=value) overrides them, as for dist-mtl.
CONFIG = {
    "seed": 0,
    "output_dir": "runs/examples/custom_model",
    "train": {"max_steps": 30, "batch_size": 64, "lr": 1e-2, "eval_every": 10, "eval_batch_size": 512},
    "log": {"every": 5, "wandb": "disabled"},  # log.wandb=offline records a W&B run as well
}


def main() -> None:
    cfg = dist_mtl.load_config(CONFIG, sys.argv[1:])

    # The tasks name the target key of a dataset item and a loss: a registered name ("ce") or any
    # callable returning per-element losses. The missing labels (NaN price, -100 cut) never reach
    # the loss: each task's loss is the mean over its labelled elements in the whole global batch.
    tasks = [
        dist_mtl.Task("price", loss=log_cosh, target="price", metrics=["mae"]),
        dist_mtl.Task("cut", loss="ce", target="cut", kind="classification", num_classes=5),
    ]

    # fit trains the model it is given as it is: seed before building it, so every process starts
    # from the same weights, and a YAML naming these classes (with this seed) starts from them too.
    torch.manual_seed(cfg.seed)
    width = 32
    model = dist_mtl.MultiTaskModel(
        encoder=TabularEncoder(width),
        heads={"price": PriceHead(width), "cut": nn.Linear(width, 5)},  # in the tasks' order
    )

    result = dist_mtl.fit(cfg, model=model, tasks=tasks,
                          train_data=Diamonds("train", rows=4000), val_data=Diamonds("val", rows=1000))
    # fit returns on every process; the summary above was printed by the first one.
    if result.final_eval and int(os.environ.get("RANK", "0")) == 0:
        print(f"price MAE {result.final_eval['eval/price/mae']:.3f} (std units of log price), "
              f"cut accuracy {result.final_eval['eval/cut/accuracy']:.1%}")


if __name__ == "__main__":
    main()
