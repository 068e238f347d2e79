"""Nested Attention on weights that exist today, through the nodes: an IP-Adapter Plus file from models/ipadapter as a
nested adapter, the official checkpoint imported by its node, the one subject word such an adapter binds (the
loader's), and the subject token's attention weight reaching the patched UNet (0 = the adapter's own weight; 1 = no
change, bit for bit)."""
import dataclasses

import pytest
import torch

from hostenv import require_comfyui

require_comfyui()
from unet_calls import run_wrapped  # noqa: E402

PROMPT = "a photo of a person on the beach"
PHOTO = torch.rand(1, 96, 80, 3, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def ip_adapter(ipadapter_plus_file, fastcomposer_models, node):
    clip = fastcomposer_models[1]
    (adapter,) = node("SubjectPersonalization_NestedAttentionIPAdapterLoader").load(ipadapter_plus_file.name, clip, " person ")
    return adapter


def test_the_ip_adapter_loader_gives_the_files_maps_for_the_words_token(ip_adapter, ipadapter_plus_file,
                                                                        fastcomposer_models):
    from safetensors.torch import load_file
    from subject_personalization.encoders.unet_layers import ip_adapter_layers
    from subject_personalization.nodes.nested_adapter_nodes import initializer_vectors
    assert (ip_adapter.base_family, ip_adapter.vision_width, ip_adapter.initializer_word) == ("sd15", 1280, "person")
    assert not ip_adapter.training and not any(parameter.requires_grad for parameter in ip_adapter.parameters())
    published = load_file(ipadapter_plus_file)
    for number, layer in ip_adapter_layers("sd15").items():
        maps = ip_adapter.projections.maps[layer.key]
        assert torch.equal(maps.to_k.weight, published[f"ip_adapter.{number}.to_k_ip.weight"].float()), layer.key
        assert torch.equal(maps.to_v.weight, published[f"ip_adapter.{number}.to_v_ip.weight"].float()), layer.key
    word, _ = initializer_vectors(fastcomposer_models[1], "person")
    assert torch.equal(ip_adapter.placeholder_embeddings["l"], word["l"])


def bound_to(node, adapter, word: str) -> tuple:
    """A subject list of one subject on `word` with `adapter` (no encoder tokens: encoding reads only the adapter)."""
    (subjects,) = node("SubjectPersonalization_AddSubject").add(PHOTO, word, 1.0, 0.0, 1.0)
    return (dataclasses.replace(subjects[0], adapter=adapter),)


@pytest.mark.parametrize("word,prompt", [("Person", "a photo of a Person on the beach"),
                                         ("old person", "a photo of an old person on the beach")])
def test_a_subject_on_the_loaders_word_or_a_phrase_ending_in_it_is_encoded(ip_adapter, fastcomposer_models, node, word,
                                                                          prompt):
    """The word's own embedding replaces the word's own token: the prompt reads as the plain one."""
    clip = fastcomposer_models[1]
    assert ip_adapter.prompt_word == "person"
    (positive,) = node("SubjectPersonalization_NestedAttentionEncode").encode(clip, bound_to(node, ip_adapter, word),
                                                                              prompt)
    (plain,) = node("CLIPTextEncode").encode(clip, prompt)
    assert torch.allclose(positive[0][0], plain[0][0], atol=1e-5)


@pytest.mark.parametrize("word,prompt", [("woman", "a photo of a woman on the beach"),
                                         ("persons", "a photo of two persons on the beach"),
                                         ("salesperson", "a photo of a salesperson on the beach")])  # sal|esp|erson
def test_a_subject_on_another_word_than_the_loaders_is_refused_naming_both(ip_adapter, fastcomposer_models, node, word,
                                                                          prompt):
    with pytest.raises(ValueError, match=rf"^subject '{word}' and its adapter ip-adapter-plus_sd15 disagree on the "
                                         rf"subject word: the adapter was loaded with 'person', .* would show "
                                         rf"'person' where the prompt says '{word}'\. Set one word in the adapter's "
                                         rf"loader and in the subject node: '{word}' in both, or 'person' in both and "
                                         rf"in the prompt"):
        node("SubjectPersonalization_NestedAttentionEncode").encode(fastcomposer_models[1],
                                                                    bound_to(node, ip_adapter, word), prompt)


def test_the_loader_refuses_a_word_of_several_tokens(ipadapter_plus_file, fastcomposer_models, node):
    with pytest.raises(ValueError, match=r"the initializer word 'salesperson' is 3 tokens for CLIP-L; choose a "
                                         r"single-token word"):
        node("SubjectPersonalization_NestedAttentionIPAdapterLoader").load(ipadapter_plus_file.name,
                                                                          fastcomposer_models[1], "salesperson")


def test_an_adapter_file_of_the_pack_binds_any_word(nested_adapter_files, fastcomposer_models, node):
    """Its token learnt to stand in for its captions' words (docs/training.md): no one word is imposed."""
    adapter_file = nested_adapter_files["nested_person_sd15"]
    (adapter,) = node("SubjectPersonalization_NestedAttentionLoader").load(adapter_file.name)
    assert adapter.initializer_word == "person" and adapter.prompt_word is None
    (positive,) = node("SubjectPersonalization_NestedAttentionEncode").encode(
        fastcomposer_models[1], bound_to(node, adapter, "woman"), "a photo of a woman on the beach")
    assert positive[0][0].shape == (1, 77, 768)


def test_an_ip_adapter_beside_the_wrong_clip_vision_is_refused_naming_both(ip_adapter, fastcomposer_models, node):
    vit_l = fastcomposer_models[3]
    with pytest.raises(ValueError, match=r"ViT-H/14.*ViT-L/14|ViT-L/14.*ViT-H/14"):
        node("SubjectPersonalization_NestedAttentionSubject").encode(ip_adapter, vit_l, PHOTO, "person", 1.0, 0.0, 1.0)


def test_the_ip_adapter_loader_refuses_an_sdxl_file_with_an_sd15_clip(comfy, fastcomposer_models, node):
    from ipadapter_files import ip_adapter_plus, write_ip_adapter
    path = write_ip_adapter(comfy.model_dir("ipadapter") / "ip-adapter-plus_sdxl_vit-h.bin",
                            ip_adapter_plus("sdxl", seed=1, widths=dict.fromkeys(range(1, 140, 2), 64), dim=64, depth=1,
                                            heads=1, num_queries=4))
    try:
        with pytest.raises(ValueError, match=r"^ip-adapter-plus_sdxl_vit-h\.bin: it is an IP-Adapter for sdxl.* connect "
                                             r"the CLIP of the sdxl checkpoint"):
            node("SubjectPersonalization_NestedAttentionIPAdapterLoader").load(path.name, fastcomposer_models[1], "person")
    finally:
        path.unlink()


@pytest.fixture(scope="module")
def unet_output(fastcomposer_models, clip_vision_h_file, ip_adapter, node):
    """The patched UNet's output for a subject made with a given token weight, adapter weight and strength."""
    model, clip = fastcomposer_models[:2]
    (vision,) = node("CLIPVisionLoader").load_clip(clip_vision_h_file.name)
    (negative,) = node("CLIPTextEncode").encode(clip, "blurry")

    def output(token_weight: float | None, adapter=ip_adapter, strength: float = 1.0) -> torch.Tensor:
        """token_weight None: the node's default choice, the adapter's own."""
        choice = {} if token_weight is None else {"token_weight_source": "token_weight below", "token_weight": token_weight}
        (subjects,) = node("SubjectPersonalization_NestedAttentionSubject").encode(adapter, vision, PHOTO, "person", 1.0,
                                                                                   0.0, 1.0, **choice)
        (positive,) = node("SubjectPersonalization_NestedAttentionEncode").encode(clip, subjects, PROMPT)
        (patched,) = node("SubjectPersonalization_ApplyNestedAttention").apply(model, positive, strength, 0.0, 1.0)
        return run_wrapped(patched, [positive[0][0], negative[0][0]], [0, 1])

    return output


def test_the_default_is_the_adapters_own_token_weight_and_a_chosen_one_replaces_it(unet_output, ip_adapter):
    assert ip_adapter.special_token_weight == 1.0
    assert torch.equal(unet_output(None), unet_output(1.0))
    heavier = copy_with_weight(ip_adapter, 2.5)
    assert torch.equal(unet_output(None, heavier), unet_output(2.5))
    assert torch.equal(unet_output(1.0, heavier), unet_output(1.0))
    assert not torch.allclose(unet_output(None, heavier), unet_output(None), atol=1e-4)


def test_the_token_weight_choice_is_a_named_option_not_a_number(node):
    optional = node("SubjectPersonalization_NestedAttentionSubject").INPUT_TYPES()["optional"]
    choices, options = optional["token_weight_source"]
    assert options["default"] == choices[0] == "adapter's own"
    assert optional["token_weight"][1]["min"] > 0 and optional["token_weight"][1]["default"] == 1.0


def test_token_weight_moves_only_the_rows_that_carry_the_subject(unet_output):
    light, heavy = unet_output(1.0), unet_output(3.0)
    assert not torch.allclose(light[0], heavy[0], atol=1e-4)
    assert torch.equal(light[1], heavy[1])  # the negative prompt's row


def test_at_strength_zero_the_token_weight_leaves_the_base_model(unet_output):
    """The weight belongs to the nested value: with strength 0 the word is the base model's, whatever the weight."""
    assert torch.equal(unet_output(3.0, strength=0.0), unet_output(1.0, strength=0.0))


def copy_with_weight(adapter, special_token_weight: float):
    """The same adapter with another special_token_weight in its metadata (what a file can carry)."""
    from subject_personalization.encoders.nested_adapter import NestedAdapter
    heavier = NestedAdapter(adapter.base_family, adapter.resampler.config, adapter.subject_domain, adapter.initializer_word,
                            adapter.placeholder_word, special_token_weight, layers=adapter.layers,
                            vision_layers=len(adapter.vision_layers))
    heavier.load_state_dict(adapter.state_dict())
    return heavier.eval().requires_grad_(False)


def test_the_official_import_node_needs_an_sdxl_clip(comfy, fastcomposer_models, node):
    (comfy.model_dir("nested_attention") / "nested_official.safetensors").write_bytes(b"")
    try:
        with pytest.raises(ValueError, match=r"is for SDXL, but this CLIP has text encoders \['l'\]: connect the CLIP "
                                             r"of an SDXL checkpoint"):
            node("SubjectPersonalization_NestedAttentionOfficialLoader").load("nested_official.safetensors", fastcomposer_models[1], "person")
    finally:
        (comfy.model_dir("nested_attention") / "nested_official.safetensors").unlink()
