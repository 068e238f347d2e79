"""Damaged and hostile files fed to every reader of the pack: each is refused, quickly, with one error type whose
message names the file, what is wrong and what to do."""
import io
import json
import pickle
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.test_nested_encoder import base_weights, official_like, tiny_adapter
from subject_personalization.encoders.checkpoint_io import UnreadableFile, read_state_dict
from subject_personalization.encoders.fastcomposer_checkpoint import convert_to_safetensors
from subject_personalization.encoders.ipadapter_plus import load_ip_adapter_plus
from subject_personalization.encoders.nested_adapter import load_nested_adapter, save_nested_adapter
from subject_personalization.encoders.official_nested_import import import_official_nested_file
from subject_personalization.encoders.unet_layers import CrossAttentionLayer, cross_attention_layers
from subject_personalization.train.config import load_config
from subject_personalization.train.dataset import SubjectDataset
from subject_personalization.train.encodings import EncodedExample, check_vision_input, load_encoded, save_encoded
from subject_personalization.train.training_state import read_training_state

FASTCOMPOSER_FIX = "mit-han-lab/fastcomposer"
ADAPTER_FIX = "copy or download the adapter again"
IMPORT_FIX = "the official demo checkpoint"
QUICKLY = 2.0  # seconds: a hostile size is refused from the header, before anything is built


def refused(call, path: Path, fix: str, problem: str | None = None) -> UnreadableFile:
    """call() must raise UnreadableFile naming the file, the problem (a regex) and the fix (a plain phrase)."""
    with pytest.raises(UnreadableFile, match=problem) as caught:
        call()
    message = str(caught.value)
    assert str(path) in message, message
    assert fix in message, message
    return caught.value


# --- damaged safetensors and pickles, through every reader of weight files ----------------------------------

def _valid_safetensors(path: Path) -> bytes:
    save_file({"a": torch.arange(64.0), "b": torch.ones(16, 4)}, path, metadata={"format": "x"})
    return path.read_bytes()


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _header_cut(path: Path) -> None:
    path.write_bytes(_valid_safetensors(path)[:20])


def _data_cut(path: Path) -> None:
    path.write_bytes(_valid_safetensors(path)[:-10])


def _header_longer_than_file(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 10 ** 6) + b'{"a": 1}')


def _garbage_header(path: Path) -> None:
    path.write_bytes(struct.pack("<Q", 12) + b"{not json!!}")


def _offsets_outside_file(path: Path) -> None:
    header = json.dumps({"a": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 16)


def torch_saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _pickle(path: Path) -> None:
    torch.save({"a": torch.zeros(2)}, path)


DAMAGES = {
    "empty": (_empty, "empty"),
    "header cut": (_header_cut, "truncated"),
    "data cut": (_data_cut, "truncated"),
    "header longer than the file": (_header_longer_than_file, "truncated"),
    "garbage header": (_garbage_header, "not valid JSON"),
    "offsets outside the file": (_offsets_outside_file, "truncated"),
    "pickle named .safetensors": (_pickle, "PyTorch pickle"),
}

EMBEDDINGS = {"l": torch.zeros(768), "g": torch.zeros(1280)}
READERS = {  # reader name -> (call on a path, what it says to do)
    "state dict reader (FastComposer loader)": (read_state_dict, "download or copy it again"),
    "fastcomposer converter": (lambda path: convert_to_safetensors(path, path.with_name("out.safetensors")),
                               FASTCOMPOSER_FIX),
    "adapter loader": (load_nested_adapter, ADAPTER_FIX),
    "official importer": (lambda path: import_official_nested_file(path, "person", EMBEDDINGS), IMPORT_FIX),
    "IP-Adapter Plus loader": (lambda path: load_ip_adapter_plus(path, "person", {"l": torch.zeros(768)}),
                               "use an IP-Adapter Plus file"),
    "encodings cache": (lambda path: load_encoded(path.parent, 0), "delete the encodings folder"),
}


# The official importer reads a pickle named .safetensors as the pickle it is (test_official_import.py).
READ_BY_CONTENT = {("official importer", "pickle named .safetensors")}


@pytest.mark.parametrize("reader,damage", [(reader, damage) for damage in DAMAGES for reader in READERS
                                           if (reader, damage) not in READ_BY_CONTENT])
def test_damaged_safetensors_are_refused_by_every_reader(tmp_path, reader, damage):
    call, fix = READERS[reader]
    write, problem = DAMAGES[damage]
    path = tmp_path / "000000.safetensors"
    write(path)
    refused(lambda: call(path), path, fix, problem)


@pytest.mark.parametrize("content,problem", [
    (b"", "the file is empty"),
    (b"\x80\x02}q\x00(X\x01", "damaged or not a PyTorch file"),
    (b"just some text", "damaged or not a PyTorch file"),
    (torch_saved([1, 2, 3]), "holds a list, not a flat dict of tensors"),
    (torch_saved({"weight": "text"}), "not a flat dict of tensors"),
    (pickle.dumps({"weight": [1.0]}), "damaged or not a PyTorch file"),
])
def test_damaged_and_foreign_pickles_are_refused(tmp_path, content, problem):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(content)
    refused(lambda: read_state_dict(path), path, "download or copy it again", problem)
    refused(lambda: convert_to_safetensors(path, tmp_path / "out.safetensors"), path, FASTCOMPOSER_FIX, problem)


def test_a_truncated_zip_pickle_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:3000])
    refused(lambda: read_state_dict(path), path, "download or copy it again", "damaged or not a PyTorch file")


def test_code_in_a_pickle_never_runs(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.zeros(1), "payload": SimpleNamespace(a=1)}, path)
    refused(lambda: read_state_dict(path), path, "download or copy it again", "never unpickles arbitrary objects")


def test_missing_files_are_named(tmp_path):
    path = tmp_path / "absent.safetensors"
    refused(lambda: load_nested_adapter(path), path, ADAPTER_FIX, "no such file")
    refused(lambda: read_state_dict(path), path, "download or copy it again", "no such file")


# --- adapters: every size in the metadata is checked against the tensors before anything is built ----------

NARROW = [CrossAttentionLayer(layer.key, layer.block, 8, 1) for layer in cross_attention_layers("sd15")]


@pytest.fixture
def adapter_file(tmp_path) -> Path:
    """A valid sd15 adapter of about 1 MB: narrow attn2 layers (8 wide) and a small resampler."""
    generator = torch.Generator().manual_seed(0)
    to_k, to_v = ({layer.key: torch.randn(8, 768, generator=generator) for layer in NARROW} for _ in range(2))
    path = tmp_path / "adapter.safetensors"
    save_nested_adapter(path, tiny_adapter(layers=NARROW, base_to_k=to_k, base_to_v=to_v, depth=2))
    assert load_nested_adapter(path).resampler.config.depth == 2
    return path


def rewrite(path: Path, metadata: dict | None = None, drop=(), add: dict | None = None, remove=()) -> Path:
    """The adapter file with metadata fields changed (JSON values encoded) or removed, tensors dropped or added."""
    with safe_open(str(path), framework="pt") as f:
        fields, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    for name, value in (metadata or {}).items():
        fields[name] = value if isinstance(value, str) else json.dumps(value)
    for name in remove:
        del fields[name]
    tensors = {key: tensor for key, tensor in tensors.items() if not any(key.startswith(prefix) for prefix in drop)}
    save_file(tensors | (add or {}), path, metadata=fields)
    return path


def field(path: Path, name: str):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[name])


@pytest.mark.parametrize("section,name,value,problem", [
    ("encoder", "depth", 1_000_000, r"encoder\.depth is 1000000 in its metadata, but its tensors give 2"),
    ("encoder", "num_queries", 10 ** 9, r"encoder\.num_queries is 1000000000 in its metadata, but its tensors give 4"),
    ("encoder", "width", 10 ** 9, r"encoder\.width is 1000000000"),
    ("clip_vision", "trained_layers", 1_000_000,
     r"clip_vision\.trained_layers is 1000000 in its metadata, but the file holds 0 vision layers"),
])
def test_hostile_sizes_are_refused_in_milliseconds(adapter_file, section, name, value, problem):
    rewrite(adapter_file, {section: field(adapter_file, section) | {name: value}})
    started = time.perf_counter()
    refused(lambda: load_nested_adapter(adapter_file), adapter_file, ADAPTER_FIX, problem)
    assert time.perf_counter() - started < QUICKLY


@pytest.mark.parametrize("prefix,first_empty,section,name", [("resampler.blocks.", 2, "encoder", "depth"),
                                                             ("vision_layers.", 0, "clip_vision", "trained_layers")])
def test_a_count_backed_only_by_empty_tensors_is_refused_quickly(adapter_file, prefix, first_empty, section, name):
    """Numbered sub-modules count only when complete: 20000 zero-size tensors do not make 20000 blocks or layers."""
    count = 20_000
    empty = {f"{prefix}{index}.norm.weight": torch.zeros(0) for index in range(first_empty, count)}
    rewrite(adapter_file, {section: field(adapter_file, section) | {name: count}}, add=empty)
    started = time.perf_counter()
    refused(lambda: load_nested_adapter(adapter_file), adapter_file, ADAPTER_FIX,
            rf"sub-module {prefix}{first_empty} does not fit: missing")
    assert time.perf_counter() - started < QUICKLY


@pytest.mark.parametrize("field_name", ["layers", "clip_vision", "encoder", "base_family", "provenance"])
def test_missing_metadata_fields_are_named(adapter_file, field_name):
    rewrite(adapter_file, remove=[field_name])
    refused(lambda: load_nested_adapter(adapter_file), adapter_file, ADAPTER_FIX, f"no '{field_name}' field")


@pytest.mark.parametrize("changes,problem", [
    ({"layers": "not json ["}, "metadata field 'layers' is not valid JSON"),
    ({"layers": {"key": "input_1_0"}}, "metadata field 'layers' should be a list, got dict"),
    ({"clip_vision": [1024]}, "metadata field 'clip_vision' should be a dict, got list"),
    ({"encoder": {"depth": "2"}}, r"encoder\.depth is '2' in its metadata, but its tensors give 2"),
    ({"encoder": {"colour": 1}}, r"encoder\.colour is not a resampler setting"),
    ({"encoder": {"heads": 0}}, "heads must be a positive integer"),
    ({"clip_vision": {"hidden_width": 1024, "hidden_state": "middle", "trained_layers": 0}},
     "clip_vision.hidden_state must be one of"),
    ({"special_token_weight": "heavy"}, "metadata field 'special_token_weight' is not valid JSON"),
    ({"special_token_weight": 0}, r"special_token_weight must be a finite number > 0 \(the weight on the subject "
                                  r"token's attention; 1 = unchanged\), got 0"),
    ({"base_family": "sd3"}, "unknown base family 'sd3'"),
])
def test_garbled_metadata_fields_are_named(adapter_file, changes, problem):
    if "encoder" in changes:
        changes = {"encoder": field(adapter_file, "encoder") | changes["encoder"]}
    rewrite(adapter_file, changes)
    refused(lambda: load_nested_adapter(adapter_file), adapter_file, ADAPTER_FIX, problem)


def test_layer_entries_are_checked(adapter_file):
    layers = field(adapter_file, "layers")
    rewrite(adapter_file, {"layers": layers[:-1] + [{"key": "output_99_0", "inner_dim": 8, "heads": 1}]})
    refused(lambda: load_nested_adapter(adapter_file), adapter_file, ADAPTER_FIX,
            "'output_99_0' is not an attn2 layer of the sd15 UNet")
    rewrite(adapter_file, {"layers": layers[:-1] + [{"key": layers[-1]["key"], "inner_dim": "8", "heads": 1}]})
    refused(lambda: load_nested_adapter(adapter_file), adapter_file, ADAPTER_FIX, "inner_dim must be a positive integer")


def test_layers_listed_without_tensors_and_tensors_without_layers(adapter_file):
    layers = field(adapter_file, "layers")
    rewrite(adapter_file, drop=["projections.maps.middle_0_0."])
    refused(lambda: load_nested_adapter(adapter_file), adapter_file, ADAPTER_FIX,
            "layers lists middle_0_0 but the file has no projection tensors for it")
    rewrite(adapter_file, {"layers": [entry for entry in layers if entry["key"] != "middle_0_0"]},
            add={"projections.maps.middle_0_0.to_k.weight": torch.zeros(8, 768),
                 "projections.maps.middle_0_0.to_v.weight": torch.zeros(8, 768)})
    refused(lambda: load_nested_adapter(adapter_file), adapter_file, ADAPTER_FIX,
            "the file has projection tensors for middle_0_0, which layers does not list")


@pytest.mark.parametrize("changes,problem", [
    ({"add": {"projections.maps.input_1_0.to_k.weight": torch.zeros(16, 768)}},
     r"projections\.maps\.input_1_0\.to_k\.weight has shape \(16, 768\), expected \(8, 768\)"),
    ({"drop": ["resampler.blocks.1.0.to_q."]}, r"resampler\.blocks\.1 does not fit: missing resampler\.blocks\.1\.0\.to_q"),
    ({"drop": ["resampler.proj_out.bias"]}, r"missing resampler\.proj_out\.bias"),
    ({"add": {"resampler.extra": torch.zeros(1)}}, r"unexpected resampler\.extra"),
    ({"add": {"resampler.base_token": torch.zeros(768, dtype=torch.int32)}}, "an adapter holds only floating-point"),
])
def test_tensor_shapes_must_match_the_metadata(adapter_file, changes, problem):
    rewrite(adapter_file, **changes)
    refused(lambda: load_nested_adapter(adapter_file), adapter_file, ADAPTER_FIX, problem)


def test_resampler_blocks_must_be_numbered_without_gaps(adapter_file):
    with safe_open(str(adapter_file), framework="pt") as f:
        moved = {key.replace("blocks.1.", "blocks.7."): f.get_tensor(key) for key in f.keys() if ".blocks.1." in key}
    rewrite(adapter_file, drop=["resampler.blocks.1."], add=moved)
    refused(lambda: load_nested_adapter(adapter_file), adapter_file, ADAPTER_FIX, r"resampler\.blocks\. are numbered 0, 7")


def test_official_import_checks_sizes_against_tensors(tmp_path):
    path = tmp_path / "official.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in official_like().items()}, path)
    assert import_official_nested_file(path, "person", EMBEDDINGS).resampler.config.depth == 2
    state = official_like()
    state["image_proj.layers.0.1.1.weight"] = torch.zeros(100, 64)  # a feed-forward width that is no multiple of 64
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, path)
    refused(lambda: import_official_nested_file(path, "person", EMBEDDINGS), path, "the layouts this import accepts are assumed",
            r"resampler\.blocks\.0\.1\.1\.weight has shape \(100, 64\)")


# --- the trainer's files ------------------------------------------------------------------------------------

@pytest.fixture
def training_state(tmp_path):
    """A module and the .state.pt a run of it writes."""
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = tmp_path / "step_0000004.state.pt"
    torch.save({"step": 4, "adapter": module.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": {}, "ema": None}, path)
    return module, path


def test_a_good_training_state_is_read(training_state):
    module, path = training_state
    assert read_training_state(path, module)["step"] == 4


@pytest.mark.parametrize("damage,problem", [
    (lambda data: b"", "the file is empty"),
    (lambda data: data[:len(data) // 2], "damaged or not a PyTorch file"),
    (lambda data: b"garbage" * 10, "damaged or not a PyTorch file"),
    (lambda data: torch_saved(["step", 4]), "holds a list, expected a dict"),
    (lambda data: torch_saved({"step": 4}), "lacks adapter, optimizer, scheduler, scaler, ema"),
])
def test_damaged_training_states_are_refused(training_state, damage, problem):
    module, path = training_state
    path.write_bytes(damage(path.read_bytes()))
    refused(lambda: read_training_state(path, module), path, "resume from an earlier checkpoint", problem)


def test_a_training_state_of_another_adapter_is_refused(training_state):
    _, path = training_state
    refused(lambda: read_training_state(path, torch.nn.Linear(5, 2)), path, "resume from an earlier checkpoint",
            r"adapter\.weight has shape \(2, 3\), expected \(2, 5\)")


def _encoded() -> EncodedExample:
    return EncodedExample(torch.zeros(4, 8, 8), torch.zeros(77, 768), torch.zeros(768), [3],
                          [torch.zeros(1, 257, 1024)], [None])


@pytest.mark.parametrize("damage,problem", [
    (lambda path: path.write_bytes(b""), "empty"),
    (lambda path: path.write_bytes(path.read_bytes()[:-100]), "truncated"),
    (lambda path: save_file({"context": torch.zeros(1)}, path, metadata={"subjects": "1"}),
     "lacks latent, pooled, positions, references_0"),
    (lambda path: save_file({"latent": torch.zeros(1)}, path), "metadata field 'subjects'"),
    (lambda path: save_file({"latent": torch.zeros(1)}, path, metadata={"subjects": "null"}),
     "metadata field 'subjects'"),
    (lambda path: save_file({"latent": torch.zeros(1)}, path, metadata={"subjects": "99999999999"}),
     "metadata field 'subjects' is '99999999999', not a count of the subjects it holds"),
])
def test_a_damaged_encodings_cache_says_to_delete_it(tmp_path, damage, problem):
    folder = tmp_path / "encodings"
    folder.mkdir()
    path = folder / "000000.safetensors"
    save_encoded(path, _encoded())
    assert load_encoded(folder, 0).positions == [3]
    damage(path)
    refused(lambda: load_encoded(folder, 0), path, f"delete the encodings folder {folder} and run again", problem)


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]"])
def test_a_damaged_vision_input_record_says_to_delete_the_cache(tmp_path, content):
    record = tmp_path / "vision_input.json"
    record.write_text(content)
    adapter = SimpleNamespace(vision_hidden_state="penultimate", vision_layers=[])
    refused(lambda: check_vision_input(tmp_path, adapter), record, f"delete the encodings folder {tmp_path}")


GOOD_LINE = json.dumps({"image": "images/0.png", "caption": "a photo of a dog",
                        "subjects": [{"word": "dog", "mask": "masks/0.png"}]})


@pytest.mark.parametrize("lines,problem", [
    ([GOOD_LINE, '{"image": "images/1.png", "caption": '], r"line 2 is not valid JSON \(Expecting value at column 38\)"),
    ([GOOD_LINE, "", "[1, 2, 3]"], "line 3: expected a JSON object, got list"),
    ([GOOD_LINE, json.dumps({"image": "x.png", "caption": "a cat"})], "line 2: missing 'subjects'"),
    ([GOOD_LINE, json.dumps({"image": "x.png", "caption": "a cat", "subjects": ["cat"]})],
     "line 2: each subject must be a JSON object"),
    ([GOOD_LINE, json.dumps({"image": 7, "caption": "a cat", "subjects": [{"word": "cat", "mask": "m.png"}]})],
     "line 2: 'image' must be a string"),
])
def test_metadata_jsonl_refusals_name_the_file_and_the_real_line(tmp_path, lines, problem):
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    refused(lambda: SubjectDataset(tmp_path, 64), tmp_path / "metadata.jsonl", "the format is in docs/training.md", problem)


def test_a_missing_metadata_jsonl_is_named(tmp_path):
    refused(lambda: SubjectDataset(tmp_path, 64), tmp_path / "metadata.jsonl", "the format is in docs/training.md", "no such file")


@pytest.mark.parametrize("name,content,problem", [
    ("run.toml", "max_steps = = 3\n", "not valid TOML"),
    ("run.toml", "\xff\xfe binary", "not UTF-8 text"),
    ("run.json", '{"max_steps": 3,', "not valid JSON"),
    ("run.json", "[1, 2]", "holds a list, expected a table of options"),
])
def test_config_files_that_do_not_parse_are_named(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_text(content, encoding="latin-1")
    refused(lambda: load_config(path), path, "train/config.py lists the options", problem)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"])
def test_files_that_are_not_images_are_named(tmp_path, content):
    pytest.importorskip("PIL")  # images are read with Pillow, which ComfyUI brings; the core tier may lack it
    from subject_personalization.train.dataset import read_image
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    refused(lambda: read_image(path), path, "readable image", "not a readable image")


def test_an_unreadable_training_image_names_its_metadata_line(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "metadata.jsonl").write_text(GOOD_LINE + "\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_bytes(b"truncated")
    dataset = SubjectDataset(tmp_path, 64)
    refused(lambda: dataset[0], tmp_path / "images" / "0.png", f"line 1 of {tmp_path / 'metadata.jsonl'}")


def test_weights_of_an_adapter_written_by_this_pack_still_load(tmp_path):
    """The checks refuse nothing the pack writes: a full-width sd15 adapter round-trips."""
    to_k, to_v = base_weights()
    path = tmp_path / "full.safetensors"
    save_nested_adapter(path, tiny_adapter(base_to_k=to_k, base_to_v=to_v, identity_width=512, identity_tokens=2))
    assert load_nested_adapter(path).resampler.config.identity_tokens == 2
