"""PLIP (Huang et al. 2023): CLIP ViT-B/32 fine-tuned on pathology tweets; projected image embeddings."""
from .generic import build_transformers
from .registry import CLIP_MEAN, CLIP_STD, register_encoder


@register_encoder("plip", dim=512, input_size=224, mean=CLIP_MEAN, std=CLIP_STD, precision="fp16", license="MIT",
                  gated=False, hub_id="vinid/plip", family="transformers", description="PLIP image tower")
def plip(pretrained: bool = True, weights: str | None = None):
    from transformers import CLIPVisionConfig

    return build_transformers("CLIPVisionModelWithProjection", CLIPVisionConfig(projection_dim=512, patch_size=32),
                              hub_id="vinid/plip", pretrained=pretrained, weights=weights, pool="embeds", name="plip")
