"""The patch under ComfyUI's multi-GPU sampling, which calls the model wrapper once per device.

Since 0.33 a MODEL prepared by ComfyUI's MultiGPU node carries a clone per extra device among its additional models
("multigpu"); the sampler then splits each step's conditionings over the devices and runs the UNet for each device in a
thread of its own (`comfy.samplers._calc_cond_batch_multigpu`), every call through the same model wrapper. Here that
path runs on two CPU devices (`cpu` and `cpu:0`, two devices to ComfyUI), through an ordinary KSampler: ComfyUI's own
scheduler, thread pool and per-device transformer options, on a patched MODEL with two subjects and a recording.
"""
import threading

import pytest
import torch

from hostenv import require_comfyui

require_comfyui()

PROMPTS = ("a photo of a person walking a dog on the beach", "a person and a dog in a park, photograph")
LATENT = {"samples": torch.zeros(1, 4, 8, 8)}
SECOND_DEVICE = torch.device("cpu", 0)


@pytest.fixture(scope="module")
def patched(comfy, fastcomposer_models, node):
    """(MODEL with Nested Attention for 'person' and 'dog' and a recording, positive of two prompts, negative)."""
    from comfy import samplers
    if not hasattr(samplers, "_calc_cond_batch_multigpu"):
        pytest.skip("this ComfyUI has no multi-device sampling (0.33 and later have)")
    from subject_personalization.nodes.nested_adapter_nodes import fresh_adapter
    model, clip, _, clip_vision, _ = fastcomposer_models
    subjects = None
    for word, seed in (("person", 1), ("dog", 2)):
        adapter = fresh_adapter(model, clip, word, "ViT-L/14", "person" if word == "person" else "pet", seed=seed)
        with torch.no_grad():
            adapter.resampler.proj_out.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
        image = torch.rand(1, 96, 80, 3, generator=torch.Generator().manual_seed(seed))
        (subjects,) = node("SubjectPersonalization_NestedAttentionSubject").encode(adapter, clip_vision, image, word, 1.0, 0.0, 1.0,
                                                            subjects=subjects)
    positives = [node("SubjectPersonalization_NestedAttentionEncode").encode(clip, subjects, prompt)[0] for prompt in PROMPTS]
    (positive,) = node("ConditioningCombine").combine(*positives)
    (negative,) = node("CLIPTextEncode").encode(clip, "blurry, lowres")
    nested = node("SubjectPersonalization_ApplyNestedAttention").apply(model, positive, 1.0, 0.0, 1.0)[0]
    recorded, recording = node("SubjectPersonalization_RecordSubjectAttention").record(nested, positive, "all", 0.0, 1.0)
    return recorded, recording, positive, negative


def on_two_devices(model):
    """The MODEL as the MultiGPU node leaves it: a base clone for the second device among its "multigpu" models (it
    shares the UNet here, which only reads its weights)."""
    second = model.clone()
    second.load_device = SECOND_DEVICE
    second.is_multigpu_base_clone = True
    both = model.clone()
    both.set_additional_models("multigpu", [second])
    return both


def spied(model, calls: list):
    """A clone whose model wrapper (the patch's) is recorded: device, thread, arguments and output of every call."""
    wrapper = model.model_options["model_function_wrapper"]

    def spy(apply_model, args):
        out = wrapper(apply_model, args)
        calls.append((args["c"]["transformer_options"].get("multigpu_thread_device"), threading.get_ident(),
                      apply_model, args, out.clone()))
        return out
    clone = model.clone()
    clone.set_model_unet_function_wrapper(spy)
    return clone


def sample(node, model, positive, negative):
    return node("KSampler").sample(model, 0, 2, 5.0, "ddim", "ddim_uniform", positive, negative, LATENT)[0]["samples"]


def test_the_wrapper_runs_once_per_device_and_gives_each_device_the_bits_of_a_single_device_call(patched, node):
    model, _, positive, negative = patched
    calls = []
    sample(node, spied(on_two_devices(model), calls), positive, negative)
    devices = {device for device, *_ in calls}
    assert devices == {torch.device("cpu"), SECOND_DEVICE}, f"the multi-device path did not run: {devices}"
    assert len({thread for _, thread, *_ in calls}) == 2
    steps = 2
    assert len(calls) == steps * len(devices), "one call per device and step"
    carried = [call for call in calls if any(kind == 0 for kind in call[3]["cond_or_uncond"])]
    assert carried, "some device ran the subjects' rows"
    for device, _, apply_model, args, out in calls:  # the same call again, alone, on this thread
        options = {key: value for key, value in args["c"]["transformer_options"].items()}
        again = model.model_options["model_function_wrapper"](
            apply_model, {**args, "c": {**args["c"], "transformer_options": options}})
        assert torch.equal(again, out), f"the call made on {device} differs from the same call made alone"


def test_recording_over_two_devices_gives_the_maps_of_one_device(patched, node):
    model, recording, positive, negative = patched
    sample(node, model, positive, negative)
    alone = recording.recorder.maps()
    sample(node, on_two_devices(model), positive, negative)
    split = recording.recorder.maps()
    assert torch.isfinite(split).all()
    torch.testing.assert_close(split, alone, rtol=1e-4, atol=1e-6)
