"""QuiltNet-B-16 (Ikezogwo et al. 2023): open_clip ViT-B/16 trained on Quilt-1M; image and text."""
from .generic import open_clip_model
from .registry import CLIP_MEAN, CLIP_STD, register_encoder


@register_encoder("quiltnet-b-16", dim=512, input_size=224, mean=CLIP_MEAN, std=CLIP_STD, precision="fp16",
                  license="MIT", gated=False, hub_id="wisdomik/QuiltNet-B-16", family="open_clip", task="image-text",
                  description="QuiltNet-B-16, open_clip ViT-B/16 on Quilt-1M")
def quiltnet_b_16(spec, pretrained: bool = True, weights: str | None = None):
    return open_clip_model(spec, "ViT-B-16", pretrained=pretrained, weights=weights)
