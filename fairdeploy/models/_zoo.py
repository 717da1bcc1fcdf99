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


@register_model("vision_transformer")
def vision_transformer(
    num_classes: int,
    image_size: int = 224,
    patch_size: int = 16,
    num_layers: int = 12,
    num_heads: int = 12,
    hidden_dim: int = 768,
    mlp_dim: int = 3072,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
) -> nn.Module:
    """torchvision's ``VisionTransformer`` in any configuration (the defaults are
    ``vit_b_16``'s; ``vit_b_16`` itself also works by its torchvision name).

    FairLRF reaches the MLP Linear layers of every encoder block
    (``encoder.layers.encoder_layer_<i>.mlp.0`` and ``.mlp.3``) and the classifier
    ``heads.head``; the attention's ``out_proj`` is used functionally by
    ``nn.MultiheadAttention`` and is refused by name.
    """
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        mlp_dim=mlp_dim,
        dropout=dropout,
        attention_dropout=attention_dropout,
        num_classes=num_classes,
    )
