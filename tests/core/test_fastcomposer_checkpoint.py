"""Safe reading and splitting of FastComposer checkpoints, on small synthetic files."""
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from subject_personalization.encoders.checkpoint_io import UnreadableFile, read_state_dict
from subject_personalization.encoders.fastcomposer_checkpoint import (SIGNATURE, check_fastcomposer, convert_to_safetensors,
                                                                      split_fastcomposer)


def tiny_fastcomposer(dtype=torch.float32):
    """Signature keys at their real shapes (zeros are cheap) plus a few keys of each part."""
    state_dict = {key: torch.zeros(shape, dtype=dtype) for key, shape in SIGNATURE.items()}
    state_dict.update({
        "text_encoder.embeddings.position_ids": torch.arange(77).view(1, 77),
        "text_encoder.final_layer_norm.weight": torch.ones(768, dtype=dtype),
        "image_encoder.vision_model.embeddings.position_ids": torch.arange(257).view(1, 257),
        "image_encoder.vision_model.post_layernorm.weight": torch.ones(1024, dtype=torch.bfloat16),
        "vae.encoder.mid_block.attentions.0.query.weight": torch.randn(4, 4, dtype=torch.float16),
        "postfuse_module.layer_norm.weight": torch.ones(768),
    })
    return state_dict


def test_split_renames_into_standard_layouts_without_copying():
    state_dict = tiny_fastcomposer()
    parts = split_fastcomposer(state_dict)
    assert "text_model.final_layer_norm.weight" in parts.text_encoder
    assert "vision_model.post_layernorm.weight" in parts.vision and "visual_projection.weight" in parts.vision
    assert "encoder.mid_block.attentions.0.query.weight" in parts.vae
    assert "conv_in.weight" in parts.unet and "layer_norm.weight" in parts.fusion
    assert not any(key.endswith("position_ids") for part in (parts.text_encoder, parts.vision) for key in part)
    assert parts.unet["conv_in.weight"].data_ptr() == state_dict["unet.conv_in.weight"].data_ptr()
    assert parts.vae["encoder.mid_block.attentions.0.query.weight"].dtype == torch.float16


def test_wrong_files_are_named_with_what_was_found():
    with pytest.raises(ValueError, match="ordinary Stable Diffusion checkpoint"):
        check_fastcomposer({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})
    sdxl_like = tiny_fastcomposer()
    sdxl_like["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(320, 2048)
    with pytest.raises(ValueError, match=r"shape \(320, 2048\), expected \(320, 768\)"):
        check_fastcomposer(sdxl_like)
    with pytest.raises(ValueError, match="missing postfuse_module"):
        check_fastcomposer({k: v for k, v in tiny_fastcomposer().items() if not k.startswith("postfuse")})
    extra = tiny_fastcomposer() | {"optimizer.state": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected key optimizer.state"):
        split_fastcomposer(extra)


def test_pickle_is_read_weights_only_and_safetensors_round_trip(tmp_path):
    state_dict = tiny_fastcomposer()
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    converted = convert_to_safetensors(tmp_path / "pytorch_model.bin", tmp_path / "fastcomposer.safetensors")
    reloaded = load_file(converted)
    assert reloaded.keys() == state_dict.keys()
    for key, tensor in state_dict.items():
        assert reloaded[key].dtype == tensor.dtype and torch.equal(reloaded[key], tensor)
    assert read_state_dict(converted).keys() == state_dict.keys()


def test_tensors_that_share_storage_convert_as_their_values(tmp_path):
    """Tied weights and views kept shared by torch.save (which safetensors cannot store) come out as plain copies."""
    state_dict = tiny_fastcomposer()
    block = torch.randn(768 * 2)
    state_dict["postfuse_module.layer_norm.weight"] = block[:768]
    state_dict["text_encoder.final_layer_norm.weight"] = block[768:]
    state_dict["postfuse_module.layer_norm.bias"] = block[:768]
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    reloaded = load_file(convert_to_safetensors(tmp_path / "pytorch_model.bin", tmp_path / "fastcomposer.safetensors"))
    for key, tensor in state_dict.items():
        assert torch.equal(reloaded[key], tensor), key


class NotATensor:
    pass


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"weight": torch.zeros(1), "payload": NotATensor()}, path)
    with pytest.raises(ValueError, match="never unpickles arbitrary objects"):
        read_state_dict(path)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    with pytest.raises(ValueError):
        read_state_dict(raw)


def test_a_pickle_named_safetensors_gets_a_clear_error(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="is a PyTorch pickle, not safetensors"):
        read_state_dict(path)


def test_safetensors_whose_header_length_starts_like_a_pickle_are_read(tmp_path):
    """The 8-byte header length of a safetensors file can begin with 0x80, the first byte of a raw pickle."""
    for padding in range(256):
        path = tmp_path / "model.safetensors"
        save_file({"weight": torch.arange(3.0)}, path, metadata={"pad": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    assert torch.equal(read_state_dict(path)["weight"], torch.arange(3.0))
    legacy = tmp_path / "legacy.safetensors"
    legacy.write_bytes(pickle.dumps({"weight": [0.0]}, protocol=2))
    with pytest.raises(ValueError, match="is a PyTorch pickle, not safetensors"):
        read_state_dict(legacy)


def test_unknown_extensions_and_missing_files(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00")
    with pytest.raises(ValueError, match="expected a .safetensors file"):
        read_state_dict(path)
    with pytest.raises(UnreadableFile, match="absent.bin: no such file"):
        read_state_dict(tmp_path / "absent.bin")


def test_conversion_refuses_non_fastcomposer_and_wrong_destination(tmp_path):
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a FastComposer checkpoint"):
        convert_to_safetensors(tmp_path / "other.safetensors", tmp_path / "out.safetensors")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        convert_to_safetensors(tmp_path / "other.safetensors", tmp_path / "out.bin")
