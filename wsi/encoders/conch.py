"""CONCH (Mahmood Lab): ViT-B/16 vision-language model; needs the authors' `conch` package."""
from .generic import wrap
from .registry import register_encoder
from .weights import load_safetensors, require_hub


@register_encoder("conch", dim=512, input_size=448, mean=(0.48145466, 0.4578275, 0.40821073),
                  std=(0.26862954, 0.26130258, 0.27577711), precision="fp16", license="CC-BY-NC-ND-4.0",
                  gated=True, hub_id="MahmoodLab/conch", family="conch", requires="conch",
                  description="pip install git+https://github.com/Mahmoodlab/CONCH.git")
def conch(pretrained: bool = True, weights: str | None = None):
    from conch.open_clip_custom import create_model, create_model_from_pretrained

    if pretrained:
        require_hub("MahmoodLab/conch", True, "conch")
        model, _ = create_model_from_pretrained("conch_ViT-B-16", "hf_hub:MahmoodLab/conch")
    else:
        model = create_model("conch_ViT-B-16")
        if weights:
            load_safetensors(model, weights)
    return wrap(model, lambda m, x: m.encode_image(x, proj_contrast=False, normalize=False))
