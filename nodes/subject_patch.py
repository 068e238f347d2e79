"""The UNet patch for subject tokens, and how it finds each subject's token in whatever batch ComfyUI builds.

Finding the token (the one place this is decided): when the prompt is encoded, each subject's token yields
one context vector, its *signature* (D values, exact). Once per UNet call, a model wrapper compares every
row of the batch's cross-attention context with each signature; a row carries the subject at every token
where the signature appears exactly. This holds however the sampler batches:
- cond and uncond together or apart: only chunks that `cond_or_uncond` marks as cond are searched, so the
  negative prompt is never touched;
- several positive conditionings of different prompts: each row is searched on its own;
- batch size > 1: rows are independent;
- prompts longer than 77 tokens, or shorter ones repeated to a common length when batched with longer
  ones: the token is found in every copy, and since repeated keys share the attention mass, giving each
  copy the subject's value is exact.
The rows found travel to the attention layers through this call's transformer_options.
"""
import logging
from dataclasses import dataclass

import torch

from comfy.ldm.modules.attention import optimized_attention

from ..attention.subject_attention import SubjectBinding, subject_attention


@dataclass(frozen=True)
class PatchedSubject:
    signature: torch.Tensor                                 # (D,) context vector of the subject's token
    strength: float
    sigma_start: float                                      # active while sigma_end <= sigma <= sigma_start
    sigma_end: float
    nested: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # layer key -> (K~, V~), each (M, inner)
    mask: torch.Tensor | None = None                        # (H, W) in [0, 1]


def layer_key(extra_options: dict) -> str:
    block_name, block_id = extra_options["block"]
    return f"{block_name}_{block_id}_{extra_options['block_index']}"


def find_subject_tokens(context: torch.Tensor, cond_or_uncond: list[int], signature: torch.Tensor) -> list[torch.Tensor]:
    """Token index of each occurrence of signature per row: a list (one per occurrence) of (B,) tensors, -1 = absent."""
    rows_per_chunk = context.shape[0] // len(cond_or_uncond)
    is_cond = torch.tensor([kind == 0 for kind in cond_or_uncond], device=context.device).repeat_interleave(rows_per_chunk)
    hits = (context == signature.to(context)).all(dim=-1) & is_cond[:, None]
    rank = hits.cumsum(dim=1)
    return [torch.where(hits.sum(1) > occurrence, ((rank == occurrence + 1) & hits).int().argmax(dim=1), -1)
            for occurrence in range(int(hits.sum(1).max()))]


class SubjectAttentionPatch:
    """Installed by `install` on a cloned MODEL: a model wrapper that finds the tokens, and attn2 replacements."""

    def __init__(self, subjects: list[PatchedSubject], options_key: str):
        self.subjects = subjects
        self.options_key = options_key
        self._device_cache: dict = {}
        self._warned = False

    def install(self, model, layer_blocks: list[tuple[str, int, int]]) -> None:
        previous_wrapper = model.model_options.get("model_function_wrapper")
        model.set_model_unet_function_wrapper(self._wrapper(previous_wrapper))
        replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        for block in layer_blocks:
            model.set_model_attn2_replace(self._attn2(replaced.get(block)), *block)

    def _wrapper(self, previous_wrapper):
        def wrapper(apply_model, args):
            conditioning, sigma = args["c"], float(args["timestep"].max())
            found = []
            for subject in self.subjects:
                if subject.sigma_end <= sigma <= subject.sigma_start:
                    for token_index in find_subject_tokens(conditioning["c_crossattn"], args["cond_or_uncond"], subject.signature):
                        found.append((subject, token_index.cpu()))  # once per step; layers read it on the host
            if found:
                options = {**conditioning.get("transformer_options", {}), self.options_key: found}
                args = {**args, "c": {**conditioning, "transformer_options": options}}
            elif 0 in args["cond_or_uncond"] and not self._warned and any(
                    s.sigma_end <= sigma <= s.sigma_start for s in self.subjects):
                logging.warning("subject personalization: no subject token found in the positive conditioning; "
                                "connect the conditioning from the subject encode node to both the patch and the sampler")
                self._warned = True
            if previous_wrapper is not None:
                return previous_wrapper(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])
        return wrapper

    def _nested(self, subject: PatchedSubject, key: str, like: torch.Tensor):
        """K~, V~ on the layer's device and dtype, converted once per generation, not per step."""
        if subject.nested is None:
            return None, None
        cache_key = (id(subject), key, like.device, like.dtype)
        if cache_key not in self._device_cache:
            keys, values = subject.nested[key]
            self._device_cache[cache_key] = (keys.to(like), values.to(like))
        return self._device_cache[cache_key]

    def _query_mask(self, subject: PatchedSubject, extra_options: dict, like: torch.Tensor):
        if subject.mask is None:
            return None
        height, width = extra_options["activations_shape"][-2:]
        cache_key = (id(subject), "mask", height, width, like.device, like.dtype)
        if cache_key not in self._device_cache:
            resized = torch.nn.functional.interpolate(subject.mask[None, None].float(), size=(height, width),
                                                      mode="bilinear", align_corners=False)
            self._device_cache[cache_key] = resized.flatten(1).to(like)
        return self._device_cache[cache_key]

    def _attn2(self, previous):
        def plain(q, k, v, extra_options):
            return previous(q, k, v, extra_options) if previous else optimized_attention(q, k, v, extra_options["n_heads"])

        def attn2(q, k, v, extra_options):
            key, bindings = layer_key(extra_options), []
            for subject, token_index in extra_options.get(self.options_key, ()):
                nested_keys, nested_values = self._nested(subject, key, q)
                if subject.mask is not None or (nested_keys is not None and subject.strength > 0):
                    bindings.append(SubjectBinding(token_index, nested_keys, nested_values, subject.strength,
                                                   self._query_mask(subject, extra_options, q)))
            if not bindings:
                return plain(q, k, v, extra_options)
            # Rows without an acting subject (the negative, other prompts) keep the unpatched kernel's output, bit
            # for bit: it runs on the whole batch, as unpatched, unless every row carries a subject.
            rows = torch.stack([binding.token_index >= 0 for binding in bindings]).any(dim=0)
            carried, heads = rows.nonzero().flatten(), extra_options["n_heads"]
            base = plain(q, k, v, extra_options) if previous is not None or not rows.all() else None
            subject_out = subject_attention(q[carried], k[carried], v[carried], heads,
                                            [_rows_of(binding, carried) for binding in bindings])
            if base is None:
                return subject_out
            if previous is not None:  # another pack's replacement keeps its effect; ours adds its difference
                subject_out += base[carried] - optimized_attention(q[carried], k[carried], v[carried], heads)
            base[carried] = subject_out
            return base
        return attn2


def _rows_of(binding: SubjectBinding, rows: torch.Tensor) -> SubjectBinding:
    """The binding restricted to some batch rows (per-row nested tensors and masks included)."""
    per_row = lambda tensor, ndim: tensor[rows.to(tensor.device)] if tensor is not None and tensor.ndim == ndim \
        and tensor.shape[0] == binding.token_index.shape[0] else tensor
    return SubjectBinding(binding.token_index[rows.cpu()], per_row(binding.nested_keys, 3),
                          per_row(binding.nested_values, 3), binding.strength, per_row(binding.query_mask, 2))
