"""H-optimus-0 (Bioptimus): ViT-g/14 with 4 registers, its own normalisation."""
from .generic import build_timm
from .registry import register_encoder


@register_encoder("h-optimus-0", dim=1536, input_size=224, mean=(0.707223, 0.578729, 0.703617),
                  std=(0.211883, 0.230117, 0.177517), precision="fp16", license="Apache-2.0", gated=True,
                  hub_id="bioptimus/H-optimus-0", description="H-optimus-0, ViT-g/14")
def h_optimus_0(spec, pretrained: bool = True, weights: str | None = None):
    return build_timm(spec, "vit_giant_patch14_reg4_dinov2", pretrained=pretrained, weights=weights, img_size=224,
                      init_values=1e-5, dynamic_img_size=False)
