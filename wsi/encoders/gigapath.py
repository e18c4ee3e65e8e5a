"""Prov-GigaPath tile encoder (Microsoft / Providence): ViT-g/16 trained with DINOv2."""
from .generic import build_timm
from .registry import register_encoder


@register_encoder("gigapath", dim=1536, input_size=224, resize=256, precision="fp16", license="Apache-2.0",
                  gated=True, hub_id="prov-gigapath/prov-gigapath", description="Prov-GigaPath tile encoder (Xu et al. 2024)")
def gigapath(spec, pretrained: bool = True, weights: str | None = None):
    return build_timm(spec, "vit_giant_patch14_dinov2", pretrained=pretrained, weights=weights, img_size=224,
                      patch_size=16, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=5.33334)
