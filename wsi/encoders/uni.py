"""UNI and UNI2-h (Mahmood Lab): DINOv2-trained ViTs, loaded with timm as the authors publish them."""
from .generic import build_timm
from .registry import register_encoder


@register_encoder("uni", dim=1024, input_size=224, precision="fp16", license="CC-BY-NC-ND-4.0", gated=True,
                  hub_id="MahmoodLab/uni", description="UNI, ViT-L/16 (Chen et al. 2024)")
def uni(spec, pretrained: bool = True, weights: str | None = None):
    return build_timm(spec, "vit_large_patch16_224", pretrained=pretrained, weights=weights, img_size=224,
                      patch_size=16, init_values=1e-5, dynamic_img_size=True)


@register_encoder("uni2-h", dim=1536, input_size=224, precision="bf16", license="CC-BY-NC-ND-4.0", gated=True,
                  hub_id="MahmoodLab/UNI2-h", description="UNI2-h, ViT-H/14 with 8 registers, SwiGLU")
def uni2_h(spec, pretrained: bool = True, weights: str | None = None):
    import timm
    import torch

    return build_timm(spec, "vit_huge_patch14_224", pretrained=pretrained, weights=weights, img_size=224,
                      patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2,
                      no_embed_class=True, mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU,
                      reg_tokens=8, dynamic_img_size=True)
