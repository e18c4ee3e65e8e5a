"""Virchow2 (Paige): ViT-H/14 with 4 registers; the embedding is [CLS, mean of patch tokens] (2560-d)."""
from .generic import build_timm, wrap
from .registry import register_encoder


def _cls_and_mean(model, x):
    import torch

    tokens = model(x)                     # (B, 1 + 4 registers + patches, 1280)
    return torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)


@register_encoder("virchow2", dim=2560, input_size=224, precision="fp16", license="CC-BY-NC-ND-4.0", gated=True,
                  hub_id="paige-ai/Virchow2", description="Virchow2 (Zimmermann et al. 2024)")
def virchow2(spec, pretrained: bool = True, weights: str | None = None):
    import timm
    import torch

    inner = build_timm(spec, "vit_huge_patch14_224", pretrained=pretrained, weights=weights, img_size=224,
                       init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True, reg_tokens=4,
                       no_embed_class=True, mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU)
    return wrap(inner, _cls_and_mean)
