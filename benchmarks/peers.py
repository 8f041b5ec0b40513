"""The real peers, side by side with our engine in one run: LibMTL 1.1.5's weighting classes and
torchjd's own ``mtl_backward``, on one process (CPU, 1 thread).

    python benchmarks/peers.py            # the reference figures (a few minutes on 1 thread)
    python benchmarks/peers.py --quick    # a smoke run: a few steps, not a measurement

For each method, on the same model (``benchmarks/jacobian.py``'s ``make_config``, built by
``benchmarks/run.py``'s ``Setup``) and the same batches:

- step time: our training step (``run.Ours``: the trainer's ``TrainStep`` with our engine and
  weighting) / the peer's step, timed in interleaved A B A B blocks (``run.interleaved``), medians;
- gradient: ||g_ours - g_peer|| / ||g_peer|| of the combined shared (encoder) gradient, both from
  the same initial parameters and the same batch (step 0).

LibMTL is driven WITHOUT its Trainer (which calls ``iterator.next()``, hard-codes
``torch.device('cuda:0')`` and lets torch >= 2.0 null the gradients that ``_reset_grad`` writes
into): ``libmtl_method`` builds the smallest object its ``AbsWeighting`` methods read from, the
way LibMTL's own ``MTLmodel(architecture, weighting)`` does, and every departure from LibMTL is
named in ``SHIMS`` and printed with the results. ``peer_rows(quick)`` returns the rows for
``benchmarks/run.py``; ``__main__`` prints them and writes ``benchmarks/peers_results.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import BATCH, HIDDEN, Ours, Setup, interleaved  # noqa: E402

from dist_mtl.aggregation import build_aggregation  # noqa: E402
from dist_mtl.compat import prepare_libmtl  # noqa: E402
from dist_mtl.engine.base import task_jacobian  # noqa: E402
from dist_mtl.distributed import Distributed  # noqa: E402
from dist_mtl.trainer import build_scheduler  # noqa: E402
from dist_mtl.weighting.base import StepResult  # noqa: E402

TASKS = 4

SHIMS: dict[str, str] = {
    "Trainer": "not used: LibMTL.Trainer calls iterator.next() (gone from Python 3 iterators), hard-codes "
               "torch.device('cuda:0') and owns the data loop; the benchmark's own loop does forward, "
               "losses, zero_grad, method.backward(losses, **kwargs), optimizer.step()",
    "MTLmodel": "LibMTL mixes the weighting class into the architecture (class MTLmodel(architecture, "
                "weighting)); the adapter subclasses the weighting class alone and sets the attributes its "
                "methods read: task_num, task_name, device, rep_grad=False, encoder, epoch, train_loss_buffer",
    "get_share_params": "the encoder's parameters, as LibMTL's AbsArchitecture returns them",
    "zero_grad_share_params": "encoder.zero_grad(set_to_none=False): LibMTL calls encoder.zero_grad(), which "
                              "since torch 2.0 sets grads to None, and _reset_grad then fails on "
                              "param.grad.data ('NoneType' object has no attribute 'data'); zeros in place "
                              "are what torch < 2.0 did",
    "device": "torch.device('cpu') (the model's device) instead of the Trainer's hard-coded 'cuda:0'",
    "import torchvision": "dist_mtl.compat.prepare_libmtl() runs prepare_torchvision() before `import LibMTL` "
                          "(its __init__ imports torchvision through LibMTL/model/resnet.py)",
    "torchvision.models.utils": "prepare_libmtl() also puts a stub module in sys.modules holding "
                                "torch.hub.load_state_dict_from_url: LibMTL/model/resnet.py imports it from "
                                "torchvision.models.utils, which torchvision 0.13 removed; only its pretrained "
                                "ResNets would call it",
    "epoch / train_loss_buffer": "set by hand (the Trainer fills them per epoch): DWA at epoch 2 and GradNorm at "
                                 "epoch 1 with a fixed loss history, so every step runs the method's own path",
    "learned loss scales": "IMTL's, GradNorm's and UW's loss_scale join the model's optimizer as one more "
                           "parameter group (lr = train.lr, no weight decay), as LibMTL's Trainer optimises "
                           "model.parameters()",
}
"""Every departure from LibMTL 1.1.5 as its Trainer would run it, printed with the results."""

BYPASSED = ("LibMTL.Trainer (data loop, meters, CUDA device strings); LibMTL architectures (HPS etc.: the "
            "model is ours, encoder + heads); rep_grad=True (representation gradients) is not exercised")

ABSENT = {
    "nashmtl": "Nash-MTL is not in LibMTL 1.1.5 (LibMTL/weighting/ has no Nash_MTL.py; later LibMTL releases add it)",
    "alignedmtl": "Aligned-MTL is not in LibMTL 1.1.5 (LibMTL/weighting/ has no Aligned_MTL.py)",
}
"""Our methods that LibMTL 1.1.5 does not ship: printed as rows with no figure."""

# (ours, LibMTL class, LibMTL kwargs, tasks, random, note). ``ours`` is ("jacobian", aggregator,
# aggregator_args) or ("sum", weighting, weighting_args).
PAIRS = [
    (("jacobian", "mgda", {}), "MGDA", {"mgda_gn": "none"}, TASKS, False,
     "both the Frank-Wolfe min-norm solver of Sener & Koltun with no gradient normalisation (LibMTL "
     "mgda_gn='none', its default); they stop differently (torchjd: step < epsilon=1e-3, 100 iterations; "
     "LibMTL: weight change < 1e-5, 250 iterations, from the best pair): the difference is solver tolerance"),
    (("jacobian", "imtlg", {}), "IMTL", {}, TASKS, False,
     "LibMTL's IMTL is IMTL-G plus IMTL-L (learned loss scales, s = 0 at the start, so this step's gradient "
     "is IMTL-G's); ours is IMTL-G (torchjd IMTLG, a pseudo-inverse); its step time includes IMTL-L"),
    (("jacobian", "cagrad", {}), "CAGrad", {"calpha": 0.4, "rescale": 0}, 3, False,
     "T=3: LibMTL 1.1.5's CAGrad hard-codes 3 tasks (x.reshape(1,3)); c = calpha = 0.4 and rescale=0 "
     "(torchjd does not rescale; LibMTL's default rescale=1 divides by 1+c^2); solvers differ (torchjd: "
     "cvxpy/Clarabel on a normalised Gramian, LibMTL: scipy SLSQP)"),
    (("jacobian", "pcgrad", {}), "PCGrad", {}, TASKS, True,
     "random: projection orders drawn by torch.randperm under our per-step seed vs LibMTL's random.shuffle "
     "(which also lets a gradient be projected on its own original, skipped by torchjd)"),
    (("jacobian", "gradvac", {}), "GradVac", {"beta": 0.5}, TASKS, True,
     "random: shuffled orders from different RNGs; also LibMTL updates its EMA target rho_T only when a "
     "pair's cosine is below it, torchjd (the paper) at every pair"),
    (("sum", "equal", {}), "EW", {}, TASKS, False, "the plain sum of task losses, both"),
    (("sum", "dwa", {"window": 1}), "DWA", {"T": 2.0}, TASKS, False,
     "the same two-period loss history fed to both (ours: window 1 step; LibMTL: epochs 0 and 1, at epoch 2); "
     "by design ours averages global (all-rank) losses and floors vanished ones, LibMTL its process's"),
    (("sum", "gradnorm", {}), "GradNorm", {"alpha": 1.5}, TASKS, False,
     "step 0: both weights are 1, so the gradients agree; the weights then move differently by design: ours "
     "balances the norms of the last shared layer (the paper's W), with its own Adam on w and renormalised "
     "to sum T; LibMTL all shared parameters, w = T softmax(logits) on the model's optimizer (and its heads get "
     "unweighted gradients)"),
    (("sum", "uncertainty", {"init": -0.5}), "UW", {}, TASKS, False,
     "ours with init -0.5 (default 0): LibMTL's L/(2 e^s) + s/2, s = -0.5, is our regression form (the "
     "synthetic tasks are regression); for classification ours is Kendall's e^-s L + s/2, LibMTL keeps 1/2"),
    (("sum", "rlw", {}), "RLW", {"dist": "Normal"}, TASKS, True,
     "random: ours draws z ~ N(0,1) from a generator seeded by (seed, step, task), the same on every rank; "
     "LibMTL from the global RNG; and LibMTL's weights softmax(z) sum to 1, ours T softmax(z) to T"),
]

MGDA_TIGHT = {"epsilon": 1e-6, "max_iters": 10000}
"""torchjd MGDA's solver run to a tight tolerance, for a second MGDA difference row."""

TORCHJD_PAIRS = [("upgrad", "UPGrad"), ("mgda", "MGDA")]


def versions() -> dict[str, str]:
    out = {}
    for name in ("LibMTL", "torchjd"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def import_libmtl():
    """``LibMTL.weighting``, after making ``import torchvision`` work; raises ImportError if absent."""
    prepare_libmtl()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import LibMTL.weighting as weighting
    return weighting


# ---------------------------------------------------------------------------------------------
# the LibMTL adapter


def libmtl_method(cls_name: str, setup: Setup, loss_history: np.ndarray | None = None, epoch: int = 0):
    """An instance of LibMTL's weighting class ``cls_name`` driving ``setup``'s model: the attributes
    its ``AbsWeighting`` methods read, nothing else (see ``SHIMS``). ``loss_history``: the
    ``train_loss_buffer`` (T x epochs) that DWA and GradNorm read, with the current ``epoch``."""
    base = getattr(import_libmtl(), cls_name)
    model = setup.model

    class Adapted(base):
        def get_share_params(self):
            return model.encoder.parameters()

        def zero_grad_share_params(self):
            model.encoder.zero_grad(set_to_none=False)

    method = Adapted()
    method.task_name = list(setup.names)
    method.task_num = len(setup.names)
    method.device = setup.dist.device
    method.rep_grad = False
    method.multi_input = False
    method.__dict__["encoder"] = model.encoder  # not a submodule: its parameters are the model's
    method.epoch = epoch
    method.train_loss_buffer = loss_history
    method.init_param()
    own = [p for p in method.parameters() if p.requires_grad]
    if own:  # learned loss scales: trained with the model, as LibMTL's Trainer does
        setup.optimizer.add_param_group({"params": own, "lr": setup.cfg.train.lr, "weight_decay": 0.0,
                                         "name": "libmtl"})
        setup.scheduler = build_scheduler(setup.cfg.train, setup.optimizer)  # one lr lambda per group
    return method


class LibMTLStep:
    """One training step as LibMTL's Trainer does it, minus the Trainer: forward, the stacked task
    losses, ``zero_grad``, ``method.backward(losses, **kwargs)``, ``optimizer.step``."""

    def __init__(self, setup: Setup, cls_name: str, kwargs: dict, loss_history=None, epoch: int = 0) -> None:
        self.s, self.kwargs = setup, kwargs
        self.method = libmtl_method(cls_name, setup, loss_history, epoch)
        self.last_weights = None

    def backward(self, batch) -> None:
        s = self.s
        ((x, targets),) = batch
        outputs = s.model(x)
        losses = torch.stack([t.mean_loss(outputs[t.name], targets[t.name]) for t in s.data.tasks])
        s.optimizer.zero_grad(set_to_none=True)
        self.last_weights = self.method.backward(losses, **self.kwargs)

    def step(self, i: int) -> None:
        self.backward(self.s.batch(i))
        self.s.optimizer.step()
        self.s.scheduler.step()


class TorchJDStep:
    """torchjd's own route, no Accelerate: forward to the features, heads, losses, then
    ``mtl_backward`` (task heads by gradient, the shared Jacobian by vmap) and ``jac_to_grad`` with
    the aggregator, then ``optimizer.step``."""

    def __init__(self, setup: Setup, aggregator: str) -> None:
        import torchjd.aggregation as aggregation

        self.s = setup
        self.aggregator = getattr(aggregation, aggregator)()
        self.shared = setup.model.shared_parameters()
        self.heads = [setup.model.head_parameters([name]) for name in setup.names]

    def backward(self, batch) -> None:
        from torchjd.autojac import jac_to_grad, mtl_backward

        s = self.s
        ((x, targets),) = batch
        features = s.model.encode(x)
        outputs = s.model.heads_forward(features, x, s.names)
        losses = [t.mean_loss(outputs[t.name], targets[t.name]) for t in s.data.tasks]
        s.optimizer.zero_grad(set_to_none=True)
        mtl_backward(losses, features=features, tasks_params=self.heads, shared_params=self.shared)
        jac_to_grad(self.shared, self.aggregator)

    def step(self, i: int) -> None:
        self.backward(self.s.batch(i))
        self.s.optimizer.step()
        self.s.scheduler.step()


# ---------------------------------------------------------------------------------------------
# ours, and the comparison


def ours_for(dist: Distributed, tasks: int, backward: str, name: str, args: dict) -> Ours:
    """``run.Ours`` with engine ``backward`` and aggregator (jacobian) or weighting (sum) ``name``."""
    setup = Setup(dist, tasks)
    if backward == "jacobian":  # default arguments: cagrad's c = 0.4 (AGGREGATORS in aggregation.py)
        ours = Ours(setup, "jacobian", name)
        if args:  # mtl.aggregator_args, as the trainer would build them
            ours.engine.aggregate = build_aggregation(name, args, tasks, setup.cfg.seed)
        return ours
    setup.cfg.mtl.weighting, setup.cfg.mtl.weighting_args = name, dict(args)
    return Ours(setup, "sum")


def our_gradient(ours: Ours, batch, step: int = 0) -> torch.Tensor:
    """Our combined shared gradient on ``batch`` at the current parameters (no update)."""
    s, engine = ours.s, ours.engine
    engine.set_counts({name: float(s.cfg.train.batch_size) for name in s.names}, 1, s.loader.complete)
    captured = {}

    def capture(losses, task=None):
        captured["g"] = flat_grad(s.model.shared_parameters())
        s.optimizer.zero_grad(set_to_none=True)
        for p in ours.weighting.parameters(s.names):
            p.grad = None

    engine.run(step, [batch], capture, s.names)
    engine.take_task_grads()  # GradNorm's per-task gradients: the trainer takes them after each step
    return captured["g"]


def flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).detach().clone()


def relative(ours: torch.Tensor, peer: torch.Tensor) -> float:
    return float((ours.double() - peer.double()).norm() / peer.double().norm())


def same_start(a: Setup, b: Setup) -> None:
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        if not torch.equal(p, q):
            raise RuntimeError("the two copies of the model start from different parameters")


def loss_history(setup: Setup, batch) -> np.ndarray:
    """A fixed two-epoch loss history (T x 2): this batch's losses, then a different fall per task."""
    ((x, targets),) = batch
    with torch.no_grad():
        outputs = setup.model(x)
        now = np.array([float(t.mean_loss(outputs[t.name], targets[t.name])) for t in setup.data.tasks])
    falls = np.linspace(0.95, 0.6, len(now))
    return np.stack([now, now * falls], axis=1)


def compare_libmtl(dist: Distributed, pair, repeats: int, steps: int) -> list[dict]:
    (backward, name, args), cls_name, kwargs, tasks, is_random, note = pair
    ours = ours_for(dist, tasks, backward, name, args)
    peer_setup = Setup(dist, tasks, ddp=False)
    same_start(ours.s, peer_setup)
    batch = ours.s.batch(0)
    history, epoch = None, 0
    if cls_name in ("DWA", "GradNorm"):
        history = loss_history(peer_setup, batch)
        epoch = 2 if cls_name == "DWA" else 1
    if cls_name == "DWA":  # the same two periods, fed to ours as two finished one-step windows
        for k in range(2):
            ours.weighting.end_step(StepResult(step=k, active=list(ours.s.names),
                                               losses=dict(zip(ours.s.names, history[:, k].tolist()))))
    peer = LibMTLStep(peer_setup, cls_name, kwargs, history, epoch)

    ours_label = f"{backward}+{name}" if backward == "jacobian" else f"sum+{name}"
    random.seed(0)  # LibMTL's random methods draw from Python's and torch's global RNGs
    torch.manual_seed(0)
    g_ours = our_gradient(ours, batch)
    peer.backward(batch)
    g_peer = flat_grad(peer_setup.model.shared_parameters())
    peer_setup.optimizer.zero_grad(set_to_none=True)
    diff_note = note
    if is_random:
        diff: float | None = None
        diff_note = f"n/a (random), measured {relative(g_ours, g_peer):.3g} with unrelated draws; " + note
    else:
        diff = relative(g_ours, g_peer)
        weights = ours.engine.aggregate.last_weights if backward == "jacobian" else None
        if weights is not None and peer.last_weights is not None and cls_name in ("MGDA", "IMTL"):
            gap = float(np.abs(weights.double().numpy() - np.asarray(peer.last_weights, dtype=np.float64)).max())
            diff_note = f"max |w_ours - w_LibMTL| = {gap:.2g}; " + note
        if cls_name == "DWA":
            w = ours.weighting.weights(0)
            diff_note = (f"weights ours {[round(w[n], 4) for n in ours.s.names]}, LibMTL "
                         f"{np.round(np.asarray(peer.last_weights, dtype=np.float64), 4).tolist()}; " + note)

        if cls_name == "CAGrad":
            diff_note = cagrad_objectives(ours, batch, peer.last_weights) + diff_note
    extra = []
    if cls_name == "MGDA":  # the same comparison with torchjd's solver run to a tight tolerance
        tight = ours_for(dist, tasks, backward, name, MGDA_TIGHT)
        extra.append({"section": "peer", "what": f"peer: {ours_label} (epsilon {MGDA_TIGHT['epsilon']:g}) vs LibMTL "
                                                 f"{cls_name}, relative gradient difference",
                      "ratio": relative(our_gradient(tight, batch), g_peer), "target": "",
                      "note": f"mtl.aggregator_args {MGDA_TIGHT}: torchjd's Frank-Wolfe run until its step is "
                              "below 1e-6; what remains is LibMTL's own stopping rule (weight change < 1e-5)"})

    times = interleaved(dist, {"ours": ours, "peer": peer}, repeats, steps)
    what = f"{ours_label} / LibMTL {cls_name}"
    rows = [{"section": "peer", "what": f"peer: {what} step time" + (f" (T={tasks})" if tasks != TASKS else ""),
             "ratio": times["ours"] / times["peer"], "target": "",
             "note": f"ours {1000 * times['ours']:.2f} ms, LibMTL {1000 * times['peer']:.2f} ms"},
            {"section": "peer", "what": f"peer: {ours_label} vs LibMTL {cls_name}, relative gradient difference",
             "ratio": diff, "target": "", "note": diff_note}, *extra]
    return rows


def cagrad_objectives(ours: Ours, batch, libmtl_weights) -> str:
    """CAGrad's objective (LibMTL's ``objfn``: w.G.1/T + c sqrt(w.G.w), c = calpha ||g_0||) at both
    solvers' simplex weights: which one found the lower minimum. Ours are recovered from torchjd's
    weights 1/T + (c / ||g_w||) w."""
    ((x, targets),) = batch
    model = ours.s.model
    with torch.enable_grad():
        outputs = model(x)
        losses = [t.mean_loss(outputs[t.name], targets[t.name]) for t in ours.s.data.tasks]
        jacobian = task_jacobian(losses, model.shared_parameters(), False).double()
    gram = (jacobian @ jacobian.T).numpy()
    tasks = len(gram)
    weights = ours.engine.aggregate.last_weights.double().numpy()
    simplex = (weights - 1 / tasks) / (weights.sum() - 1)
    c = 0.4 * np.sqrt(gram.mean())

    def objective(w):
        w = np.asarray(w, dtype=np.float64)
        return float(w @ gram @ np.full(tasks, 1 / tasks) + c * np.sqrt(w @ gram @ w + 1e-8))

    return (f"objective at ours' w {objective(simplex):.7g}, at LibMTL's {objective(libmtl_weights):.7g} "
            f"(lower is better); ")


def compare_torchjd(dist: Distributed, name: str, cls_name: str, repeats: int, steps: int) -> list[dict]:
    ours = ours_for(dist, TASKS, "jacobian", name, {})
    peer_setup = Setup(dist, TASKS, ddp=False)
    same_start(ours.s, peer_setup)
    peer = TorchJDStep(peer_setup, cls_name)
    batch = ours.s.batch(0)
    g_ours = our_gradient(ours, batch)
    peer.backward(batch)
    g_peer = flat_grad(peer.shared)
    peer_setup.optimizer.zero_grad(set_to_none=True)
    times = interleaved(dist, {"ours": ours, "peer": peer}, repeats, steps)
    return [{"section": "peer", "what": f"peer: jacobian+{name} / torchjd mtl_backward {cls_name} step time",
             "ratio": times["ours"] / times["peer"], "target": "",
             "note": f"ours {1000 * times['ours']:.2f} ms (T autograd.grad calls on CPU), torchjd "
                     f"{1000 * times['peer']:.2f} ms (one vmap over the features' Jacobian)"},
            {"section": "peer", "what": f"peer: jacobian+{name} vs torchjd mtl_backward {cls_name}, "
                                        f"relative gradient difference",
             "ratio": relative(g_ours, g_peer), "target": "",
             "note": "the same torchjd aggregator on the same Jacobian, computed two ways (per-task "
                     "autograd.grad of the parameters vs the features' Jacobian then vmap): any difference is "
                     "rounding"}]


def peer_rows(quick: bool) -> dict:
    """The ``peer`` rows of the benchmark table (see the module docstring), with the shims and the
    versions. Runs on this process with 1 thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    repeats, steps = (2, 2) if quick else (7, 15)
    rows: list[dict] = []
    try:
        dist = Distributed.create()
        for name, cls_name in TORCHJD_PAIRS:
            rows += compare_torchjd(dist, name, cls_name, repeats, steps)
        try:
            import_libmtl()
        except ImportError as e:
            rows.append({"section": "peer", "what": "peer: LibMTL", "ratio": None, "target": "",
                         "note": f"not importable ({e}): pip install 'dist_mtl[bench]'"})
        else:
            for pair in PAIRS:
                rows += compare_libmtl(dist, pair, repeats, steps)
            for name, why in ABSENT.items():
                rows.append({"section": "peer", "what": f"peer: jacobian+{name} / LibMTL", "ratio": None,
                             "target": "", "note": why})
    finally:
        torch.set_num_threads(threads)
    v = versions()
    return {"rows": rows, "shims": dict(SHIMS), "bypassed": BYPASSED, "libmtl": v["LibMTL"],
            "torchjd": v["torchjd"], "quick": quick,
            "setup": f"MLP 64-{HIDDEN}x3, T={TASKS} unless stated, batch {BATCH}, CPU, 1 thread"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps each: a smoke run, not a measurement")
    parser.add_argument("--output", default=str(HERE / "peers_results.json"))
    args = parser.parse_args(argv)
    started = time.time()
    result = peer_rows(args.quick)
    result["seconds"] = time.time() - started
    print(f"peers: LibMTL {result['libmtl']}, torchjd {result['torchjd']}, torch {torch.__version__}; "
          f"{result['setup']}; medians of interleaved blocks{'  (QUICK: not a measurement)' if args.quick else ''}")
    for row in result["rows"]:
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.3g}"
        print(f"{row['what']:78s} {ratio:>9s}  {row['note']}")
    print("shims (LibMTL driven without its Trainer):")
    for key, text in result["shims"].items():
        print(f"  {key}: {text}")
    print(f"bypassed: {result['bypassed']}")
    print(f"{result['seconds']:.0f} s")
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
