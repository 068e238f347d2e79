"""The patch in a graph that branches: one patched MODEL feeding two differently patched paths, and one patch extended
two ways, leak nothing into each other.

Since ComfyUI 0.14 `ModelPatcher.clone()` copies the dicts and lists of `model_options` but shares the objects in them,
so a patch object changed after it was installed would change every branch that holds it. Each case below builds a
first patched MODEL, then two extensions of it; the first MODEL must carry the same objects and compute the same bits
as before, and each extension must compute what it computes when built alone on a fresh first patch.
"""
import pytest
import torch

from hostenv import require_comfyui

require_comfyui()
from unet_calls import run_wrapped  # noqa: E402

PERSON_AND_DOG = "a photo of a person walking a dog on the beach"
CAT = "a photo of a cat asleep on a sofa"


@pytest.fixture(scope="module")
def conditionings(fastcomposer_models, node):
    """{name: (positive, negative)}: a person and a dog (two adapters), and a cat (a third), each with a visible effect."""
    from subject_personalization.nodes.nested_adapter_nodes import fresh_adapter
    model, clip, _, clip_vision, _ = fastcomposer_models
    (negative,) = node("CLIPTextEncode").encode(clip, "blurry, lowres")
    encoded = {}
    for name, prompt, words in (("person and dog", PERSON_AND_DOG, ("person", "dog")), ("cat", CAT, ("cat",))):
        subjects = None
        for word in words:
            seed = {"person": 1, "dog": 2, "cat": 3}[word]
            adapter = fresh_adapter(model, clip, word, "ViT-L/14", "pet" if word != "person" else "person", seed=seed)
            with torch.no_grad():  # a fresh adapter starts at the base model: make the subject visible
                adapter.resampler.proj_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
            image = torch.rand(1, 96, 80, 3, generator=torch.Generator().manual_seed(seed))
            (subjects,) = node("SubjectPersonalization_NestedAttentionSubject").encode(adapter, clip_vision, image, word, 1.0, 0.0, 1.0,
                                                                subjects=subjects)
        (positive,) = node("SubjectPersonalization_NestedAttentionEncode").encode(clip, subjects, prompt)
        encoded[name] = (positive, negative)
    return encoded


def output(model, conditioning) -> torch.Tensor:
    """One UNet call through the model's wrapper: a cond row and an uncond row."""
    positive, negative = conditioning
    return run_wrapped(model, [positive[0][0], negative[0][0]], [0, 1])


def carried(model) -> object:
    """What the sampler reads from the MODEL's options, down to the identity of every object held in them."""
    def walk(value):
        if isinstance(value, dict):
            return tuple(sorted(((str(key), walk(item)) for key, item in value.items()), key=lambda entry: entry[0]))
        if isinstance(value, (list, tuple)):
            return tuple(walk(item) for item in value)
        return id(value)
    return walk(model.model_options)


def extension(name: str, conditionings, node):
    """The ways a patched MODEL is patched further in a graph: more subjects (another encode), or a recording."""
    if name == "recording":
        return lambda model: node("SubjectPersonalization_RecordSubjectAttention").record(model, conditionings["person and dog"][0], "all",
                                                                   0.0, 1.0)
    strength = {"cat": 1.0, "cat at half strength": 0.5}[name]
    return lambda model: (node("SubjectPersonalization_ApplyNestedAttention").apply(model, conditionings["cat"][0], strength, 0.0, 1.0)[0],
                          None)


@pytest.mark.parametrize("ways", [("cat", "recording"), ("cat", "cat at half strength")],
                         ids=["two different patches", "one patch extended two ways"])
def test_branches_of_a_patched_model_leak_nothing_into_each_other(fastcomposer_models, conditionings, node, ways):
    def first_patch():
        return node("SubjectPersonalization_ApplyNestedAttention").apply(fastcomposer_models[0], conditionings["person and dog"][0], 1.0,
                                                  0.0, 1.0)[0]

    first = first_patch()
    before, holds = output(first, conditionings["person and dog"]), carried(first)
    branches = [extension(way, conditionings, node)(first) for way in ways]
    outputs = {way: {name: output(model, conditioning) for name, conditioning in conditionings.items()}
               for way, (model, _) in zip(ways, branches)}

    assert carried(first) == holds, "building the branches changed what the first MODEL holds"
    assert torch.equal(output(first, conditionings["person and dog"]), before)
    for way, (model, recording) in zip(ways, branches):
        alone, _ = extension(way, conditionings, node)(first_patch())
        for name, conditioning in conditionings.items():
            assert torch.equal(outputs[way][name], output(alone, conditioning)), f"{way} on {name}"
    assert not torch.equal(outputs[ways[0]]["cat"], output(first, conditionings["cat"])), "the extension acts"
    if ways[1] == "recording":  # only the recording branch records, and recording leaves the image as it is
        recording = branches[1][1]
        assert torch.equal(outputs["recording"]["person and dog"], before)
        recording.recorder.reset()
        output(first, conditionings["person and dog"])
        output(branches[0][0], conditionings["person and dog"])
        assert recording.recorder.count == 0
        output(branches[1][0], conditionings["person and dog"])
        assert recording.recorder.count > 0
    else:
        assert not torch.equal(outputs[ways[0]]["cat"], outputs[ways[1]]["cat"])
