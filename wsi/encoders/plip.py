"""PLIP (Huang et al. 2023): CLIP ViT-B/32 fine-tuned on pathology tweets. Features: the projected image
embedding; as an image-text model it also encodes text (transformers CLIPModel)."""
from .generic import transformers_clip_model
from .registry import CLIP_MEAN, CLIP_STD, register_encoder


@register_encoder("plip", dim=512, input_size=224, mean=CLIP_MEAN, std=CLIP_STD, precision="fp16", license="MIT",
                  gated=False, hub_id="vinid/plip", family="transformers", task="image-text",
                  description="PLIP, CLIP ViT-B/32 on pathology image-text pairs")
def plip(spec, pretrained: bool = True, weights: str | None = None):
    from transformers import CLIPConfig

    cfg = CLIPConfig(projection_dim=512, vision_config={"patch_size": 32, "image_size": 224})
    return transformers_clip_model(spec, cfg, pretrained=pretrained, weights=weights)
