"""MIL models: one registry, one small file per model, each wrapped as a dual-level model.

    from mil.models import create_model, list_models
    model = create_model("abmil", in_dim=1024, n_classes=2)      # DualMIL: bag branch + instance student
    out = model(x, mask)            # x (B, N, D), mask (B, N) True = real -> MILOutput
    loss = F.cross_entropy(out.bag_logits, y) + model.extra_loss(out, y)
    out = model.predict_bag(features)                            # one whole bag (N, D), eval mode

Models: abmil (Ilse 2018), clam-sb (Lu 2021), dsmil (Li 2021), transmil (Shao 2021). Each entry's
paper, reference code, its license and default hyper-parameters are on its `@register_model`
decorator. Every model is padding-aware: a padded batch gives the same outputs as each bag alone.
"""
from .base import DualMIL, GatedAttention, InstanceStudent, MILOutput, instancewise, masked_softmax
from .registry import MILSpec, create_model, get_spec, list_models, register_model

__all__ = ["DualMIL", "GatedAttention", "InstanceStudent", "MILOutput", "MILSpec", "create_model", "get_spec",
           "instancewise", "list_models", "masked_softmax", "register_model"]
