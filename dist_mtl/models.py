"""Encoders registry, task heads and the multi-task model."""

from __future__ import annotations

from torch import Tensor, nn

from .config import ModelConfig

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def mlp(widths: list[int], activation: str, dropout: float = 0.0, layer_norm: bool = False,
        final_activation: bool = True) -> nn.Sequential:
    """Linear layers ``widths[0] -> ... -> widths[-1]`` with activation (and optional LayerNorm,
    dropout) after each one; ``final_activation=False`` leaves the last layer linear."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(widths) - 2 or final_activation:
            if layer_norm:
                layers.append(nn.LayerNorm(d_out))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """Shared MLP trunk: ``input_dim -> hidden[0] -> ... -> hidden[-1]``."""

    def __init__(self, input_dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.net = mlp([input_dim, *cfg.hidden], cfg.activation, cfg.dropout, cfg.layer_norm)
        self.out_dim = cfg.hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


# name -> class(input_dim, ModelConfig) with an ``out_dim`` attribute
ENCODERS: dict[str, type[nn.Module]] = {"mlp": MLPEncoder}


class MultiTaskModel(nn.Module):
    """A shared encoder and one head per task; ``forward(x)`` returns ``{task: output}``."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: Tensor, tasks: list[str] | None = None) -> dict[str, Tensor]:
        features = self.encoder(x)
        names = self.heads.keys() if tasks is None else tasks
        return {name: self.heads[name](features) for name in names}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder's trainable parameters, in a fixed order."""
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """The weight matrix of the encoder's last linear (or convolutional) layer: GradNorm's W."""
        layers = [m for m in self.encoder.modules() if getattr(m, "weight", None) is not None and m.weight.dim() >= 2]
        return [layers[-1].weight]

    def head_parameters(self, tasks: list[str]) -> list[nn.Parameter]:
        """The trainable parameters of these tasks' heads, in the order given."""
        return [p for name in tasks for p in self.heads[name].parameters() if p.requires_grad]


def build_model(cfg: ModelConfig, input_dim: int, head_dims: dict[str, int]) -> MultiTaskModel:
    """Build the encoder named in ``cfg`` and one head per task of the given output width."""
    encoder = ENCODERS[cfg.encoder](input_dim, cfg)
    heads = {name: mlp([encoder.out_dim, *cfg.head_hidden, dim], cfg.activation, final_activation=False)
             for name, dim in head_dims.items()}
    return MultiTaskModel(encoder, heads)
