"""``rlw``: Random Loss Weighting (Lin, Ye, Xu, Shi & Zhang, TMLR 2022, "Reasonable effectiveness of
random weighting").

At every step, z_t ~ N(0, 1) and w = T * softmax(z). The paper's weights sum to 1; they are scaled
by T here so that the learning rate means what it means with ``equal`` (as DWA and GradNorm do).

Each z_t is drawn from a generator seeded by (seed, step, task name) alone: identical on every rank
and after a resume without any saved state, and a task keeps its draws when the task list is
reordered. The research code draws from each rank's global RNG, so the ranks train different
objectives.
"""

from __future__ import annotations

import math
import zlib

import torch

from .base import Weighting


def rlw_draw(seed: int, step: int, task: str) -> float:
    """The standard-normal draw of ``task`` at ``step``."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + zlib.crc32(task.encode())) % 2**63)
    return float(torch.randn((), generator=generator, dtype=torch.float64))


class RandomWeighting(Weighting):
    name = "rlw"

    def setup(self, cfg) -> None:
        self.seed = cfg.seed
        self._cache: tuple[int, dict[str, float]] | None = None

    def weights(self, step: int) -> dict[str, float]:
        if self._cache is None or self._cache[0] != step:
            exps = {name: math.exp(rlw_draw(self.seed, step, name)) for name in self.task_names}
            total = sum(exps.values())
            self._cache = (step, {name: self.num_tasks * e / total for name, e in exps.items()})
        return dict(self._cache[1])
