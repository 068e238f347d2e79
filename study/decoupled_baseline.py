"""A baseline that is not the pack's: IP-Adapter's decoupled cross-attention, ungated, for the study's method (b).

    out = softmax(q K^T / sqrt(d)) V + scale * softmax(q K_ip^T / sqrt(d)) V_ip

K_ip, V_ip are the subject's keys and values from the adapter's own parts (the resampler's tokens through each layer's
bias-free maps: what an IP-Adapter Plus file holds). Added to every query of the conditional rows, whatever the prompt
says: IP-Adapter's form (its negative rows get the image of a blank reference; here they get nothing, as CFG's
unconditional branch of a prompt without the subject). Installed as attn2 replacements on a clone of the MODEL.
"""
import torch


def decoupled_model(model, adapter, tokens: torch.Tensor, scale: float):
    """A clone of MODEL with every attn2 layer adding scale * attention over the subject's (K_ip, V_ip)."""
    from comfy.ldm.modules.attention import optimized_attention

    from ..nodes.base_model import model_cross_attention_layers
    from ..nodes.subject_patch import layer_key
    keys_values = adapter.projections.project(tokens.float())

    def replacement(q, k, v, extra_options):
        out = optimized_attention(q, k, v, extra_options["n_heads"])
        conditional = torch.tensor([kind == 0 for kind in extra_options["cond_or_uncond"]], device=q.device)
        rows = conditional.repeat_interleave(q.shape[0] // len(conditional))
        if rows.any():
            image_keys, image_values = (x.to(q) for x in keys_values[layer_key(extra_options)])
            count = int(rows.sum())
            image = optimized_attention(q[rows], image_keys.expand(count, -1, -1), image_values.expand(count, -1, -1),
                                        extra_options["n_heads"])
            out = out.index_add(0, rows.nonzero()[:, 0], scale * image)
        return out

    patched = model.clone()
    for layer in model_cross_attention_layers(model):
        patched.set_model_attn2_replace(replacement, *layer.block)
    return patched
