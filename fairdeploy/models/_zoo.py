"""Built-in architectures."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fairdeploy.models._registry import register_model


@register_model("vgg11_paper")
def vgg11_paper(num_classes: int, dropout: float = 0.5) -> nn.Module:
    """The paper's VGG-11: torchvision's VGG-11 without batch norm, adaptive pooling
    replaced by identity, so a 112×112 input flattens to 512·3·3 = 4608.

    classifier = Linear(4608, 4096), ReLU, Dropout, Linear(4096, 4096) (FC-2,
    ``classifier.3``), ReLU, Dropout, Linear(4096, num_classes).
    """
    import torchvision

    model = torchvision.models.vgg11(weights=None, num_classes=num_classes, dropout=dropout)
    model.avgpool = nn.Identity()
    model.classifier[0] = nn.Linear(512 * 3 * 3, 4096)
    return model


@register_model("mlp")
def mlp(
    num_classes: int,
    in_features: int = 38,
    widths: Sequence[int] = (256, 256),
    dropout: float = 0.0,
) -> nn.Module:
    """A multilayer perceptron: ``layers.0`` Linear, ReLU[, Dropout], ... , Linear.

    Linear layers are named ``layers.<i>`` in an ``nn.Sequential``.
    """
    mods: list[nn.Module] = []
    prev = in_features
    for w in widths:
        mods += [nn.Linear(prev, int(w)), nn.ReLU()]
        if dropout:
            mods.append(nn.Dropout(dropout))
        prev = int(w)
    mods.append(nn.Linear(prev, num_classes))
    return _MLP(nn.Sequential(*mods))


class _MLP(nn.Module):
    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.layers(x.flatten(1))
