"""``compat.optimizer_step``: the prepared optimizer stepped without accelerate's per-call import
probes when its wrapper would only forward the call, and through the wrapper when it would not."""

from __future__ import annotations

import accelerate.optimizer
import torch

from dist_mtl.compat import optimizer_step
from dist_mtl.distributed import Distributed


def prepared(scaler: bool):
    dist = Distributed.create()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dist.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=4.0) if scaler else None
    model, optimizer = dist.accelerator.prepare(model, optimizer)
    dist.accelerator.scaler = None
    return model, optimizer


def test_without_a_scaler_the_wrapped_optimizer_steps_directly(monkeypatch):
    probes = []
    monkeypatch.setattr(accelerate.optimizer, "is_lomo_available", lambda: probes.append(1) or False)
    model, optimizer = prepared(scaler=False)
    reference = torch.nn.Linear(4, 2)
    reference.load_state_dict(model.state_dict())
    before = model.weight.detach().clone()
    for m in (model, reference):
        m(torch.ones(3, 4)).sum().backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    optimizer_step(optimizer)
    assert torch.equal(model.weight.detach(), reference.weight.detach())  # the SGD step, exactly
    assert not torch.equal(model.weight.detach(), before)  # it did move
    assert probes == []  # the wrapper (and its probes) was not called
    optimizer.step()  # the wrapper itself probes: the patch above is what it calls
    assert probes


def test_with_a_loss_scaler_the_wrapper_steps_it(monkeypatch):
    probes = []
    monkeypatch.setattr(accelerate.optimizer, "is_lomo_available", lambda: probes.append(1) or False)
    model, optimizer = prepared(scaler=True)
    assert optimizer.scaler is not None
    before = model.weight.detach().clone()
    (optimizer.scaler.scale(model(torch.ones(3, 4)).sum())).backward()
    optimizer_step(optimizer)  # the scaler unscales (grads / 4) and steps
    assert probes  # through the wrapper
    assert not torch.equal(model.weight.detach(), before)
