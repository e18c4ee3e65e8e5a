"""Phikon and Phikon-v2 (Owkin): iBOT ViT-B/16 and DINOv2 ViT-L, loaded with transformers; CLS token."""
from .generic import build_transformers
from .registry import register_encoder


@register_encoder("phikon", dim=768, input_size=224, precision="fp16", license="Owkin non-commercial",
                  gated=False, hub_id="owkin/phikon", family="transformers", description="Phikon, ViT-B/16 (iBOT)")
def phikon(spec, pretrained: bool = True, weights: str | None = None):
    from transformers import ViTConfig

    return build_transformers(spec, "ViTModel", ViTConfig(image_size=224, patch_size=16), pretrained=pretrained,
                              weights=weights, add_pooling_layer=False)


@register_encoder("phikon-v2", dim=1024, input_size=224, precision="bf16", license="Owkin non-commercial",
                  gated=False, hub_id="owkin/phikon-v2", family="transformers", description="Phikon-v2, ViT-L (DINOv2)")
def phikon_v2(spec, pretrained: bool = True, weights: str | None = None):
    from transformers import Dinov2Config

    cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=16,
                       image_size=224, layerscale_value=1e-5)
    return build_transformers(spec, "Dinov2Model" if not pretrained else "AutoModel", cfg, pretrained=pretrained,
                              weights=weights)
