"""CLAM's baseline: ImageNet ResNet-50 cut after layer 3, average-pooled (1024-d)."""
from .generic import build_timm, wrap
from .registry import register_encoder


@register_encoder("resnet50-trunc", dim=1024, input_size=224, precision="fp32", license="BSD-3-Clause",
                  gated=False, hub_id="timm/resnet50.tv_in1k", description="ResNet-50 to layer 3 (CLAM, Lu et al. 2021)")
def resnet50_trunc(spec, pretrained: bool = True, weights: str | None = None):
    inner = build_timm(spec, "resnet50.tv_in1k", pretrained=pretrained, weights=weights, features_only=True,
                       out_indices=(3,))
    return wrap(inner, lambda m, x: m(x)[-1].mean(dim=(2, 3)))
