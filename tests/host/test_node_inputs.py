"""Bad values that reach a node from an API prompt, a link or a script: an error on that node, before anything is
built, naming the input, the value, what is allowed and the fix (nodes/input_checks.py)."""
import copy
import math

import pytest
import torch

from hostenv import require_comfyui

require_comfyui()

IMAGE = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
MASK = torch.ones(1, 64, 64)
EMPTY_IMAGE = torch.zeros(0, 64, 64, 3)


@pytest.fixture(scope="module")
def valid(fastcomposer_models, nested_adapter_files, node):
    """Inputs each node accepts, by node name; every case below spoils one or two of them."""
    model, clip, _, clip_vision, fusion = fastcomposer_models
    (adapter,) = node("SubjectPersonalization_NestedAttentionLoader").load(nested_adapter_files["nested_person_sd15"].name)
    (positive,) = node("CLIPTextEncode").encode(clip, "a photo of a person")
    subject = {"image": IMAGE, "weight": 1.0, "start_percent": 0.0, "end_percent": 1.0, "mask": MASK, "mask_feather": 0}
    return {
        "SubjectPersonalization_AddSubject": {**subject, "word": "man"},
        "SubjectPersonalization_NestedAttentionSubject": {**subject, "nested_adapter": adapter, "clip_vision": clip_vision, "word": "person"},
        "SubjectPersonalization_ApplyNestedAttention": {"model": model, "positive": positive, "strength": 1.0, "start_percent": 0.0,
                                 "end_percent": 1.0},
        "SubjectPersonalization_RecordSubjectAttention": {"model": model, "positive": positive, "layers": "all", "start_percent": 0.0,
                                   "end_percent": 1.0},
        "SubjectPersonalization_SubjectAttentionMaps": {"recording": None, "image": IMAGE, "opacity": 0.6, "mask_threshold": 0.5},
        "SubjectPersonalization_FastComposerEncode": {"clip": clip, "clip_vision": clip_vision, "fastcomposer": fusion,
                               "text": "a man <|image|>", "subject_words": "", "text_only_fraction": 0.2,
                               "subject_1": IMAGE},
        "SubjectPersonalization_SubjectRegionMask": {"width": 64, "height": 64, "left": 0.0, "top": 0.0, "right": 0.5, "bottom": 1.0},
        "SubjectPersonalization_PrepareSubjectWithMask": {"image": IMAGE, "mask": MASK, "size": 64, "margin": 0.1, "background": "black"},
        "SubjectPersonalization_PrepareFace": {"image": IMAGE, "model": "antelopev2", "face_index": -1, "size": 512},
        "SubjectPersonalization_NestedAttentionNewAdapter": {"model": model, "clip": clip, "initializer_word": "person",
                                      "subject_domain": "person", "vision_model": "ViT-L/14", "seed": 0,
                                      "filename": "refused", "overwrite": False},
    }


def run(node, name, inputs):
    instance = node(name)
    return getattr(instance, instance.FUNCTION)(**inputs)


CASES = [  # node, the spoilt inputs, the message
    ("SubjectPersonalization_ApplyNestedAttention", {"strength": 5.0}, r"strength 5.0 is outside its range 0.0 to 2.0: set strength within"),
    ("SubjectPersonalization_ApplyNestedAttention", {"strength": math.nan}, r"strength nan is outside its range 0.0 to 2.0"),
    ("SubjectPersonalization_ApplyNestedAttention", {"strength": "1.0"}, r"strength '1.0' is not a number: give a number from 0.0 to 2.0"),
    ("SubjectPersonalization_ApplyNestedAttention", {"start_percent": 0.8, "end_percent": 0.2},
     r"start_percent 0.8 is after end_percent 0.2, which leaves nothing between them: set start_percent below"),
    ("SubjectPersonalization_ApplyNestedAttention", {"end_percent": 1.5}, r"end_percent 1.5 is outside its range 0.0 to 1.0"),
    ("SubjectPersonalization_AddSubject", {"weight": -1.0}, r"weight -1.0 is outside its range 0.0 to 2.0"),
    ("SubjectPersonalization_AddSubject", {"mask_feather": 300}, r"mask_feather 300 is outside its range 0 to 256"),
    ("SubjectPersonalization_AddSubject", {"mask_feather": 2.5}, r"mask_feather 2.5 is not a whole number: give a whole number from 0 to 256"),
    ("SubjectPersonalization_AddSubject", {"start_percent": 0.5, "end_percent": 0.5}, r"start_percent 0.5 is equal to end_percent 0.5"),
    ("SubjectPersonalization_AddSubject", {"image": EMPTY_IMAGE}, r"image is empty \(shape \(0, 64, 64, 3\)\): connect at least one image"),
    ("SubjectPersonalization_AddSubject", {"image": IMAGE[0]}, r"image has shape \(64, 64, 3\), not an IMAGE \(B, H, W, C\)"),
    ("SubjectPersonalization_AddSubject", {"mask": torch.zeros(0, 64, 64)}, r"mask is empty \(shape \(0, 64, 64\)\): connect a mask with"),
    ("SubjectPersonalization_AddSubject", {"mask": MASK[None]}, r"mask has shape \(1, 1, 64, 64\), not a MASK \(H, W\) or \(B, H, W\)"),
    ("SubjectPersonalization_NestedAttentionSubject", {"weight": math.nan}, r"weight nan is outside its range 0.0 to 2.0"),
    ("SubjectPersonalization_NestedAttentionSubject", {"start_percent": 0.9, "end_percent": 0.1}, r"start_percent 0.9 is after end_percent 0.1"),
    ("SubjectPersonalization_NestedAttentionSubject", {"image": EMPTY_IMAGE}, r"image is empty \(shape \(0, 64, 64, 3\)\)"),
    ("SubjectPersonalization_NestedAttentionSubject", {"mask": MASK.expand(2, -1, -1)}, r"a subject takes one mask, got a batch of 2"),
    ("SubjectPersonalization_RecordSubjectAttention", {"start_percent": 0.8, "end_percent": 0.2}, r"start_percent 0.8 is after end_percent 0.2"),
    ("SubjectPersonalization_RecordSubjectAttention", {"layers": "everything"},
     r"layers 'everything' is not one of its choices \['all', .*\]: pick one of them"),
    ("SubjectPersonalization_SubjectAttentionMaps", {"opacity": 2.0}, r"opacity 2.0 is outside its range 0.0 to 1.0"),
    ("SubjectPersonalization_SubjectAttentionMaps", {"image": EMPTY_IMAGE}, r"image is empty"),
    ("SubjectPersonalization_FastComposerEncode", {"text_only_fraction": 1.5}, r"text_only_fraction 1.5 is outside its range 0.0 to 1.0"),
    ("SubjectPersonalization_FastComposerEncode", {"subject_1": EMPTY_IMAGE}, r"subject_1 is empty \(shape \(0, 64, 64, 3\)\)"),
    ("SubjectPersonalization_SubjectRegionMask", {"width": 0}, r"width 0 is outside its range 8 to 8192"),
    ("SubjectPersonalization_SubjectRegionMask", {"left": 0.6, "right": 0.4}, r"left 0.6 is after right 0.4, .*: set left below right"),
    ("SubjectPersonalization_SubjectRegionMask", {"top": -0.1}, r"top -0.1 is outside its range 0.0 to 1.0"),
    ("SubjectPersonalization_PrepareSubjectWithMask", {"margin": 3.0}, r"margin 3.0 is outside its range 0.0 to 2.0"),
    ("SubjectPersonalization_PrepareSubjectWithMask", {"mask": torch.zeros(1, 0, 0)}, r"mask is empty"),
    ("SubjectPersonalization_PrepareFace", {"face_index": -2}, r"face_index -2 is outside its range -1 to 63"),
    ("SubjectPersonalization_PrepareFace", {"image": EMPTY_IMAGE}, r"image is empty"),
    ("SubjectPersonalization_NestedAttentionNewAdapter", {"seed": -1}, r"seed -1 is outside its range 0 to 2147483647"),
    ("SubjectPersonalization_NestedAttentionNewAdapter", {"subject_domain": "car"}, r"subject_domain 'car' is not one of its choices"),
    ("SubjectPersonalization_NestedAttentionNewAdapter", {"filename": "../outside"},
     r"filename '../outside' is not a plain file name: the adapter is saved in .*nested_attention; give a name without folders"),
    ("SubjectPersonalization_NestedAttentionNewAdapter", {"filename": "sub/name"}, r"filename 'sub/name' is not a plain file name"),
    ("SubjectPersonalization_NestedAttentionNewAdapter", {"filename": " "}, r"filename ' ' is not a plain file name"),
]


@pytest.mark.parametrize("name, spoilt, message", CASES, ids=[f"{name}-{'-'.join(spoilt)}" for name, spoilt, _ in CASES])
def test_a_bad_value_fails_on_its_node_naming_the_value_and_the_fix(valid, node, name, spoilt, message):
    with pytest.raises(ValueError, match=message):
        run(node, name, {**valid[name], **spoilt})


def test_a_refused_value_leaves_the_model_untouched(fastcomposer_models, valid, node):
    model = fastcomposer_models[0]
    before = copy.deepcopy(model.model_options)
    for name in ("SubjectPersonalization_ApplyNestedAttention", "SubjectPersonalization_RecordSubjectAttention"):
        with pytest.raises(ValueError, match="start_percent 1.0 is after end_percent 0.0"):
            run(node, name, {**valid[name], "start_percent": 1.0, "end_percent": 0.0})
    assert model.model_options == before and not model.patches


def test_a_new_adapter_never_replaces_a_file_unless_told(comfy, valid, node):
    """Create Nested Attention Adapter stops on a name that is taken, leaving the file; overwrite replaces it."""
    from subject_personalization.encoders.nested_adapter import load_nested_adapter
    path = comfy.model_dir("nested_attention") / "taken.safetensors"
    path.write_bytes(b"the user's adapter")
    inputs = {**valid["SubjectPersonalization_NestedAttentionNewAdapter"], "filename": "taken"}
    try:
        with pytest.raises(ValueError, match=r"taken\.safetensors exists and overwrite is off: choose another filename, "
                                             r"or turn overwrite on to replace it"):
            run(node, "SubjectPersonalization_NestedAttentionNewAdapter", inputs)
        assert path.read_bytes() == b"the user's adapter"
        (adapter,) = run(node, "SubjectPersonalization_NestedAttentionNewAdapter", {**inputs, "overwrite": True})
        assert adapter.name == "taken" and load_nested_adapter(path).initializer_word == "person"
    finally:
        path.unlink(missing_ok=True)
