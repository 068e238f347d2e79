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

What only the sampler's inputs reveal is checked once per sampling run, when it starts (an OUTER_SAMPLE wrapper,
before the first UNet call): some positive conditioning of the sampler must carry a subject of the patch, searched
as above (a patched model sampled with a prompt the encode node did not make would silently render no subject),
and the mask of each subject found must have the latent's aspect ratio. Conditionings without subjects next to one
with them, and subjects acting on part of the schedule only, are fine; the negative is never searched.

One patch per MODEL: nested values (Apply Nested Attention), regional masks (Apply Subject Masks) and
attention-map recording (Record Subject Attention) all act in the same attention call. A node that adds
to a model already carrying the patch extends it (a subject already there is not added twice) instead of
stacking a second one.

Other packs' attn2 replacements (IPAdapter, InstantID, PuLID and the like), in either order: the patch keeps no entry
in the MODEL's `patches_replace`. At each UNet call that carries a subject, the model wrapper takes the attn2 entry
ComfyUI would call at each cross-attention layer (its `(block, number, index)` key, else its `(block, number)` key)
and puts, for that call only, a replacement of its own at the three-part key that wraps it: the other pack's output
on every row, plus the subjects' difference on the rows that carry them. So a pack's node placed before or after
this pack's finds only its own entries: it installs them, or `.add()`s to them, with its own code and keys, and
ComfyUI's precedence decides which of them runs, exactly as it would without this pack; neither order can shadow or
mutate the other's entries, and both orders compute the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import comfy.patcher_extension
from comfy.ldm.modules.attention import attention_pytorch, optimized_attention

from ..attention.attention_maps import AttentionMapRecorder
from ..attention.subject_attention import SubjectBinding, keeps_rows_without_subjects_plain, subject_attention
from ..attention.subject_masks import check_mask_fits, layer_query_mask
from ..encoders.unet_layers import cross_attention_layers
from .base_model import model_family

PATCH_KEY = "subject_personalization_patch"  # in transformer_options: the SubjectAttentionPatch in effect


@dataclass(frozen=True)
class PatchedSubject:
    signature: torch.Tensor                                 # (D,) context vector of the subject's token
    source: object                                          # the Subject it renders (one per subject, several signatures)
    strength: float = 0.0
    sigma_start: float = float("inf")                       # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    nested: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None  # layer key -> (K~, V~), each (M, inner)
    mask: torch.Tensor | None = None                        # (H, W) in [0, 1]
    token_weight: float = 1.0                               # on s*'s attention, where its nested value acts

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


class AttentionRecording:
    """What Record Subject Attention asked for, and the maps recorded during the last sampling run."""

    def __init__(self, sources: list, words: list[str], blocks: frozenset[str], sigma_start: float, sigma_end: float):
        self.sources, self.words, self.blocks = sources, words, blocks
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.recorder = AttentionMapRecorder()

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; the recording is shared
        return self

    def active(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


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


def check_sampling_inputs(subjects: list[PatchedSubject], positive: list[dict], latent_size: tuple[int, int]) -> None:
    """Refuse a sampler whose positive conditionings (ComfyUI's cond dicts) carry none of the subjects, or whose
    latent has another aspect ratio than the mask of a subject they carry."""
    contexts = [cond["cross_attn"] for cond in positive if cond.get("cross_attn") is not None]
    found = [subject for subject in subjects
             if any(find_subject_tokens(context, [0], subject.signature) for context in contexts)]
    if not found:
        words = ", ".join(dict.fromkeys(f"'{s.source.word}'" for s in subjects if s.source.word))  # subject_N have none
        raise ValueError(f"no positive conditioning of this sampler carries a subject token of the patched MODEL"
                         f"{f' (subjects {words})' if words else ''}: connect the conditioning from the subject encode "
                         f"node (Nested Attention Encode / FastComposer Encode) to both the patch node and the "
                         f"sampler's positive input")
    for subject in found:
        if subject.mask is not None:
            try:
                check_mask_fits(tuple(subject.mask.shape), latent_size)
            except ValueError as error:  # the same message, naming the subject
                raise ValueError(f"subject '{subject.source.word}': {error}") from None


def add_subject_patch(model, subjects: list[PatchedSubject], recording: AttentionRecording | None = None):
    """A clone of model whose cross-attention renders these subjects (and records, if asked)."""
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    current = options.get(PATCH_KEY)
    if current is not None and patched.model_options.get("model_function_wrapper") == current.wrapper:
        patch = current.extended(subjects, recording)
    else:  # first patch, or another pack wrapped ours since: stack a new one over that pack's wrapper
        blocks = tuple(layer.block for layer in cross_attention_layers(model_family(model)))
        known = {id(subject.signature) for subject in current.subjects} if current is not None else set()
        patch = SubjectAttentionPatch([s for s in subjects if id(s.signature) not in known], recording,
                                      patched.model_options.get("model_function_wrapper"), blocks, below=current)
    patch.install(patched)
    return patched


class SubjectAttentionPatch:
    """A model wrapper that finds the subject tokens, the attn2 replacements that act on them, and the check made when
    sampling starts."""

    def __init__(self, subjects: list[PatchedSubject], recording: AttentionRecording | None, previous_wrapper,
                 blocks: tuple[tuple[str, int, int], ...], below: "SubjectAttentionPatch | None" = None):
        self.subjects, self.recording = subjects, recording
        self.previous_wrapper, self.blocks = previous_wrapper, blocks  # blocks: the (block, number, index) of each layer
        self.below = below  # the patch this one was stacked over (another pack's wrapper between them), still acting
        self.options_key = f"{PATCH_KEY}_{id(self)}"
        self._device_cache: dict = {}

    def __deepcopy__(self, memo):  # shared by the clones of the patched model, like the functions that use it
        return self

    def extended(self, subjects: list[PatchedSubject], recording: AttentionRecording | None) -> "SubjectAttentionPatch":
        """This patch plus more subjects; for a token already here, an entry that acts replaces a record-only one."""
        merged = {id(subject.signature): subject for subject in self.subjects}
        for subject in subjects:
            known = merged.get(id(subject.signature))
            if known is None or (known.mask is None and known.nested is None):
                merged[id(subject.signature)] = subject
        return SubjectAttentionPatch(list(merged.values()), recording or self.recording, self.previous_wrapper,
                                     self.blocks, self.below)

    def install(self, model) -> None:
        model.set_model_unet_function_wrapper(self.wrapper)
        model.model_options["transformer_options"][PATCH_KEY] = self
        wrappers = model.model_options["transformer_options"].setdefault("wrappers", {})
        wrappers.get(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, {}).pop(PATCH_KEY, None)  # this one covers it
        comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PATCH_KEY,
                                                     self._start_sampling, model.model_options, is_model_options=True)

    def _stack(self) -> list["SubjectAttentionPatch"]:
        return [self] + (self.below._stack() if self.below is not None else [])

    def all_subjects(self) -> list[PatchedSubject]:
        """The subjects of this patch and of the patches it was stacked over: every subject the MODEL renders."""
        return [subject for patch in self._stack() for subject in patch.subjects]

    def _start_sampling(self, executor, noise, *args, **kwargs):
        """Once per sampling run: check what the sampler was given, then record afresh (a cached recording node is
        reused by the next run)."""
        conds = getattr(executor.class_obj, "conds", None) or {}
        if "positive" in conds:  # every guider of ComfyUI's has one; another pack's may name its conds otherwise
            check_sampling_inputs(self.all_subjects(), conds["positive"], tuple(noise.shape[-2:]))
        for patch in self._stack():
            if patch.recording is not None:
                patch.recording.recorder.reset()
        return executor(noise, *args, **kwargs)

    def wrapper(self, apply_model, args):
        conditioning, sigma = args["c"], float(args["timestep"].max())
        found = []
        for subject in self.subjects:
            if subject.active(sigma):
                for token_index in find_subject_tokens(conditioning["c_crossattn"], args["cond_or_uncond"], subject.signature):
                    found.append((subject, tuple(token_index.tolist())))  # once per step: layers never read back
        if found:
            record = self.recording is not None and self.recording.active(sigma)
            options = conditioning.get("transformer_options", {})
            options = {**options, "patches_replace": self.call_replacements(options), self.options_key: (found, record)}
            args = {**args, "c": {**conditioning, "transformer_options": options}}
        if self.previous_wrapper is not None:
            return self.previous_wrapper(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def call_replacements(self, transformer_options: dict) -> dict:
        """The `patches_replace` of one UNet call: each cross-attention layer's attn2 is this patch's replacement, wrapping
        the entry ComfyUI would have called there (the three-part key first, as ComfyUI looks it up)."""
        replace = transformer_options.get("patches_replace", {})
        attn2 = dict(replace.get("attn2", {}))
        for block in self.blocks:
            previous = attn2[block] if block in attn2 else attn2.get(block[:2])
            attn2[block] = self.layer_replacement(previous)
        return {**replace, "attn2": attn2}

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
            self._device_cache[cache_key] = layer_query_mask(subject.mask, height, width).to(like)
        return self._device_cache[cache_key]

    def layer_replacement(self, previous):
        """The attn2 replacement of one layer for one UNet call: `previous` is another pack's, or None."""
        def attn2(q, k, v, extra_options):
            found, record_step = extra_options.get(self.options_key, ((), False))
            record = record_step and extra_options["block"][0] in self.recording.blocks
            key, bindings, sources = layer_key(extra_options), [], []
            for subject, token_index in found:
                nested_keys, nested_values = self._nested(subject, key, q)
                nests = nested_keys is not None and subject.strength > 0
                if subject.mask is not None or nests or (record and subject.source in self.recording.sources):
                    # the token weight belongs to the nested value: strength 0 leaves the word as the base model has it
                    bindings.append(SubjectBinding(token_index, nested_keys, nested_values, subject.strength,
                                                   self._query_mask(subject, extra_options, q),
                                                   subject.token_weight if nests else 1.0))
                    sources.append(subject.source)
            heads = extra_options["n_heads"]
            if not bindings:
                return previous(q, k, v, extra_options) if previous is not None else host_attention(q, k, v, extra_options)
            rows = [any(binding.token_positions[row] >= 0 for binding in bindings) for row in range(q.shape[0])]
            # one call over the whole batch where the rows without subjects get ComfyUI's own bits from it (its SDPA)
            whole_batch = all(rows) or (previous is None and host_attention_is_sdpa(extra_options)
                                        and keeps_rows_without_subjects_plain(q, k, v, bindings))
            if whole_batch:
                carried, carried_q, carried_k, carried_v, carried_bindings = slice(None), q, k, v, bindings
            else:
                carried = _row_selection(rows)
                carried_q, carried_k, carried_v = q[carried], k[carried], v[carried]
                carried_bindings = [_rows_of(binding, carried) for binding in bindings]
            if not record:
                subject_out = subject_attention(carried_q, carried_k, carried_v, heads, carried_bindings)
            else:
                subject_out, probs = subject_attention(carried_q, carried_k, carried_v, heads, carried_bindings,
                                                       return_subject_probs=True)
                self._record(probs, carried, sources, q.shape[0], extra_options)
            if previous is not None:  # another pack's replacement keeps its effect on every row; ours adds its difference
                out = previous(q, k, v, extra_options)
                subject_out += out[carried] - host_attention(carried_q, carried_k, carried_v, extra_options)
                out[carried] = subject_out
                return out
            if whole_batch:
                return subject_out
            # Every row is attended once: the rows without an acting subject (the negative, other prompts) by ComfyUI's
            # own kernel, which gives them the unpatched bits wherever it is batch-invariant (SDPA; host tests).
            others = _row_selection([not carries for carries in rows])
            others_out = host_attention(q[others], k[others], v[others], extra_options)
            if isinstance(carried, slice) and isinstance(others, slice):  # e.g. cond then uncond: one copy of each
                in_order = carried.start < others.start
                return torch.cat([subject_out, others_out] if in_order else [others_out, subject_out])
            out = subject_out.new_empty((q.shape[0], *subject_out.shape[1:]))
            out[carried] = subject_out
            out[others] = others_out
            return out
        return attn2

    def _record(self, probs: torch.Tensor, carried: slice | list[int], sources: list, batch: int, extra_options: dict):
        """Per recorded subject, its token's attention per image token, averaged over the positive chunks."""
        recorded = self.recording.sources
        height, width = extra_options["activations_shape"][-2:]
        maps = probs.new_zeros(batch, len(recorded), probs.shape[-1])
        for column, source in enumerate(sources):
            if source in recorded:
                maps[carried, recorded.index(source)] += probs[:, column]
        cond_or_uncond = extra_options["cond_or_uncond"]
        chunks = maps.unflatten(0, (len(cond_or_uncond), -1))
        positive = [index for index, kind in enumerate(cond_or_uncond) if kind == 0]
        self.recording.recorder.add(chunks[positive].mean(dim=0), height, width)


def host_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """ComfyUI's attention for this layer, called as its own CrossAttention calls it: the attention backend a node
    chose for this model (extra_options' override) included."""
    return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                               transformer_options=extra_options)


def host_attention_is_sdpa(extra_options: dict) -> bool:
    """Whether host_attention runs torch's scaled_dot_product_attention: ComfyUI's pytorch attention, no backend
    chosen for this model."""
    return optimized_attention is attention_pytorch and "optimized_attention_override" not in extra_options


def _row_selection(rows: list[bool]) -> slice | list[int]:
    """The batch rows where `rows` is true: a slice when they are consecutive (views, no copies), else their indices."""
    positions = [row for row, selected in enumerate(rows) if selected]
    first, last = positions[0], positions[-1]
    return slice(first, last + 1) if last - first + 1 == len(positions) else positions


def _rows_of(binding: SubjectBinding, rows: slice | list[int]) -> SubjectBinding:
    """The binding restricted to some batch rows (per-row nested tensors and masks included)."""
    def per_row(tensor: torch.Tensor | None, ndim: int) -> torch.Tensor | None:
        is_per_row = tensor is not None and tensor.ndim == ndim and tensor.shape[0] == len(binding.token_positions)
        return tensor[rows] if is_per_row else tensor

    positions = binding.token_positions
    taken = positions[rows] if isinstance(rows, slice) else tuple(positions[row] for row in rows)
    return SubjectBinding(taken, per_row(binding.nested_keys, 3), per_row(binding.nested_values, 3),
                          binding.strength, per_row(binding.query_mask, 2), binding.token_weight)
