"""Reading every file the pack reads: weights, training state, caches, text and images, each checked before use.

Safetensors headers are parsed and checked (size, JSON, dtypes, offsets inside the file) before any tensor is read;
pickles are read only through PyTorch's weights-only unpickler; text files are decoded and parsed with the file's
name and the real line number in the refusal. Every refusal is one error type, `UnreadableFile`, whose message
names the file, what is wrong and what to do (the caller says what to do: only it knows what the file is for).
"""
import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on its JSON header
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
              "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4,
              "U64": 8, "I64": 8, "F64": 8, "C64": 8}
REPLACE_FILE = "download or copy it again"


class UnreadableFile(ValueError):
    """A file the pack refuses to use: `path`, the `problem` found, and the `fix` to apply."""

    def __init__(self, path: str | Path, problem: str, fix: str):
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"cannot use {path}: {problem}; {fix}")

    def __reduce__(self):  # the message is rebuilt from the parts (exceptions cross process boundaries under DDP)
        return type(self), (self.path, self.problem, self.fix)


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]                  # safetensors dtype names: "F32", "BF16", ...


def looks_like_pickle(path: Path) -> bool:
    """Whether the file starts like a PyTorch pickle (zip-based or raw) rather than like safetensors."""
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header (whose length may start with 0x80).
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= Path(path).stat().st_size - 8:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # zip-based torch.save, or a raw pickle


def weights_format(path: str | Path, fix: str = REPLACE_FILE) -> str:
    """"safetensors" or "pickle", as the file's first bytes say, whatever its name; UnreadableFile when they say
    neither. A safetensors header that does not fit the file is left to `read_safetensors_header` to describe."""
    path = _existing(path, fix)
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise UnreadableFile(path, "the file is empty (0 bytes)", fix)
    if looks_like_pickle(path):
        return "pickle"
    if head[8:9] == b"{":
        return "safetensors"
    raise UnreadableFile(path, "it is neither safetensors (an 8-byte header length, then a JSON header) nor a PyTorch "
                               "pickle (a zip archive or a raw pickle)", fix)


def _existing(path: str | Path, fix: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UnreadableFile(path, "no such file" if not path.exists() else "it is not a file", fix)
    return path


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entries(path: Path, header: dict, data_bytes: int, fix: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Every tensor entry well-formed, of a known dtype, and the tensors tiling the data section exactly."""
    shapes, dtypes, spans = {}, {}, []
    for name, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
                and all(_is_count(size) for size in entry["shape"]) and isinstance(entry.get("data_offsets"), list)
                and len(entry["data_offsets"]) == 2 and all(_is_count(offset) for offset in entry["data_offsets"])):
            raise UnreadableFile(path, f"its header entry for tensor {name!r} is malformed ({str(entry)[:80]}): the "
                                       f"file is damaged or not safetensors", fix)
        if entry["dtype"] not in ITEM_BYTES:
            raise UnreadableFile(path, f"tensor {name!r} has dtype {entry['dtype']!r}, which PyTorch cannot read", fix)
        begin, end = entry["data_offsets"]
        needed = math.prod(entry["shape"]) * ITEM_BYTES[entry["dtype"]]
        if end > data_bytes:
            raise UnreadableFile(path, f"tensor {name!r} ends at byte {end} of the data, but the file holds only "
                                       f"{data_bytes}: it is truncated", fix)
        if end - begin != needed:
            raise UnreadableFile(path, f"tensor {name!r} ({entry['dtype']}, shape {tuple(entry['shape'])}) needs "
                                       f"{needed} bytes but its offsets span {end - begin}: the file is damaged", fix)
        shapes[name], dtypes[name] = tuple(entry["shape"]), entry["dtype"]
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise UnreadableFile(path, f"the data of tensor {name!r} starts at byte {begin}, expected {position} "
                                       f"(tensors overlap or leave gaps): the file is damaged", fix)
        position = end
    if position != data_bytes:
        raise UnreadableFile(path, f"{data_bytes - position} bytes follow the last tensor: the file is damaged", fix)
    return shapes, dtypes


def read_safetensors_header(path: str | Path, fix: str = REPLACE_FILE) -> SafetensorsHeader:
    """The metadata and tensor shapes of a safetensors file, with its whole layout checked; no tensor is read."""
    path = _existing(path, fix)
    if looks_like_pickle(path):
        raise UnreadableFile(path, "it is a PyTorch pickle, not safetensors (pickles can run code when loaded, so it "
                                   "is not read as one)", fix)
    size = path.stat().st_size
    if size == 0:
        raise UnreadableFile(path, "the file is empty (0 bytes)", fix)
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > size - 8:
            raise UnreadableFile(path, f"its header claims {length} bytes but only {max(size - 8, 0)} follow: the file "
                                       f"is truncated or not safetensors", fix)
        if length > MAX_HEADER_BYTES:
            raise UnreadableFile(path, f"its header claims {length} bytes, more than a safetensors header may have", fix)
        text = f.read(length)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnreadableFile(path, f"its header is not valid JSON ({error}): the file is damaged or not safetensors",
                             fix) from None
    if not isinstance(header, dict):
        raise UnreadableFile(path, f"its header is a JSON {type(header).__name__}, not an object: the file is damaged "
                                   f"or not safetensors", fix)
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())):
        raise UnreadableFile(path, "its __metadata__ is not a table of strings: the file is damaged", fix)
    return SafetensorsHeader(metadata, *_check_entries(path, header, size - 8 - length, fix))


def read_safetensors(path: str | Path, fix: str = REPLACE_FILE,
                     keys: Sequence[str] | None = None) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file whose header passed `read_safetensors_header`; `keys`: read only these
    tensors (each must be in the file)."""
    header = read_safetensors_header(path, fix)
    missing = [key for key in keys or () if key not in header.shapes]
    if missing:
        raise UnreadableFile(path, f"it has no tensor {', '.join(missing)}", fix)
    try:
        with safe_open(str(path), framework="pt") as f:
            return header.metadata, {key: f.get_tensor(key) for key in (f.keys() if keys is None else keys)}
    except (SafetensorError, OSError) as error:  # what the header check cannot see, e.g. a read error
        raise UnreadableFile(path, f"its tensors could not be read ({error})", fix) from None


def _pickle_problem(error: Exception) -> str:
    """What torch.load's error says about the file: a forbidden object (named), or damage."""
    text = str(error)
    forbidden = re.search(r"GLOBAL (\S+)", text)
    if forbidden:
        return (f"it holds a {forbidden.group(1)} object, and this pack never unpickles arbitrary objects (loading them "
                f"can run code)")
    if isinstance(error, EOFError):
        return "its data ends early: the file is truncated"
    detail = next((line.strip() for line in text.splitlines() if "Unsupported" in line),
                  text.splitlines()[0] if text.strip() else "no message")
    return f"it is damaged or not a PyTorch file ({type(error).__name__}: {detail})"


def read_pickle(path: str | Path, fix: str = REPLACE_FILE, memory_map: bool = False) -> object:
    """A PyTorch pickle read with the weights-only unpickler (tensors, numbers, strings, lists, dicts and nothing
    else: nothing in it can run code). `memory_map`: page the tensors in from the file instead of copying them."""
    path = _existing(path, fix)
    if path.stat().st_size == 0:
        raise UnreadableFile(path, "the file is empty (0 bytes)", fix)
    try:
        # Only zip-based files can be mapped; legacy pickles cannot.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=memory_map and zipfile.is_zipfile(path))
    except Exception as error:  # torch.load reports damage as any of EOFError, IndexError, KeyError, RuntimeError...
        raise UnreadableFile(path, _pickle_problem(error), fix) from None


def flat_state_dict(value: object, grouped: bool = False) -> dict[str, torch.Tensor]:
    """A dict of tensors as it is; with `grouped`, also a dict whose values are dicts of tensors (IP-Adapter's .bin:
    {"image_proj": {...}, "ip_adapter": {...}}), flattened to "<group>.<key>" as its .safetensors form names them.
    ValueError saying what the value holds instead."""
    expected = "a flat dict of tensors" + (" or a dict of such dicts" if grouped else "")
    if not isinstance(value, dict):
        raise ValueError(f"it holds a {type(value).__name__}, not {expected}")
    entries = {}
    for key, entry in value.items():
        inner = entry.items() if grouped and isinstance(entry, dict) else [(None, entry)]
        for name, tensor in inner:
            where = repr(key) if name is None else f"{key!r} / {name!r}"
            if not isinstance(key, str) or not isinstance(name, (str, type(None))):
                raise ValueError(f"its entry {where} is not named by text: it is not {expected}")
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"its entry {where} is a {type(tensor).__name__}, not a tensor: it is not {expected}")
            flat_key = key if name is None else f"{key}.{name}"
            if flat_key in entries:
                raise ValueError(f"it names the tensor {flat_key} twice, flat and grouped")
            entries[flat_key] = tensor
    return entries


def read_state_dict(path: str | Path, fix: str = REPLACE_FILE, grouped: bool = False,
                    by_content: bool = False) -> dict[str, torch.Tensor]:
    """A flat tensor dict from .safetensors or a PyTorch pickle (memory-mapped, weights-only); `grouped`: a pickle may
    also be a dict of dicts of tensors, flattened as `flat_state_dict` says. Which of the two the file is: its suffix
    says, or with `by_content` its first bytes (`weights_format`), whatever its name."""
    path = _existing(path, fix)
    if by_content:
        is_safetensors = weights_format(path, fix) == "safetensors"
    elif path.suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        is_safetensors = path.suffix in SAFETENSORS_SUFFIXES
    else:
        raise UnreadableFile(path, f"expected a .safetensors file or a PyTorch pickle ({', '.join(PICKLE_SUFFIXES)}), "
                                   f"not {path.suffix or 'a file without extension'}", fix)
    if is_safetensors:
        return read_safetensors(path, fix)[1]
    value = read_pickle(path, fix, memory_map=True)
    try:
        return flat_state_dict(value, grouped)
    except ValueError as error:
        raise UnreadableFile(path, str(error), fix) from None


def check_model_file(path: str | Path, fix: str = REPLACE_FILE) -> None:
    """The container of a weight file another loader (ComfyUI's) reads: a safetensors layout checked in full, or a
    PyTorch pickle that is a complete zip archive or a raw pickle. No tensor is read."""
    path = _existing(path, fix)
    if path.suffix in SAFETENSORS_SUFFIXES:
        read_safetensors_header(path, fix)
        return
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise UnreadableFile(path, "the file is empty (0 bytes)", fix)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):  # the zip directory is at the end: truncation loses it
        raise UnreadableFile(path, "it is a PyTorch zip archive without its directory: the file is truncated", fix)
    if not head.startswith((b"PK", b"\x80")):
        raise UnreadableFile(path, "it is neither safetensors nor a PyTorch pickle", fix)


def _read_text(path: str | Path, fix: str) -> tuple[Path, str]:
    path = _existing(path, fix)
    try:
        return path, path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UnreadableFile(path, f"it is not UTF-8 text (byte {error.start})", fix) from None
    except OSError as error:
        raise UnreadableFile(path, f"it cannot be read ({error.strerror})", fix) from None


def read_json(path: str | Path, fix: str = REPLACE_FILE) -> object:
    """A JSON file's value; a syntax error is reported with its line and column."""
    path, text = _read_text(path, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UnreadableFile(path, f"it is not valid JSON ({error})", fix) from None


def read_toml(path: str | Path, fix: str = REPLACE_FILE) -> dict:
    """A TOML file's table; a syntax error is reported with its line and column."""
    toml = _toml_parser(path)
    path, text = _read_text(path, fix)
    try:
        return toml.loads(text)
    except toml.TOMLDecodeError as error:
        raise UnreadableFile(path, f"it is not valid TOML ({error})", fix) from None


def _toml_parser(path: str | Path):
    """Python's tomllib (3.11+), or on 3.10 the tomli package it was made from."""
    try:
        import tomllib  # novermin (3.11+; the fallback below serves 3.10)
        return tomllib
    except ImportError:
        try:
            import tomli
            return tomli
        except ImportError:
            raise UnreadableFile(path, "this Python (3.10) has no TOML parser", "pip install tomli, or give the "
                                 "config as JSON (the same keys)") from None


def read_jsonl(path: str | Path, fix: str = REPLACE_FILE) -> list[tuple[int, object]]:
    """(line number from 1, value) of every non-blank line of a JSON Lines file."""
    path, text = _read_text(path, fix)
    values = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise UnreadableFile(path, f"line {number} is not valid JSON ({error.msg} at column {error.colno})",
                                 fix) from None
    return values


def read_image(path: str | Path, mode: str, fix: str = REPLACE_FILE) -> np.ndarray:
    """An image file as a uint8 array in a PIL mode ("RGB": (H, W, 3), "L": (H, W)), fully decoded here."""
    from PIL import Image  # Pillow comes with ComfyUI; the rest of this module must not need it (the core tier)
    path = _existing(path, fix)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableFile(path, f"it is not a readable image ({error})", fix) from None


def listed_keys(keys: Sequence[str], shown: int = 12) -> str:
    """Keys for a message: the first `shown` in order, then how many more."""
    return f"{', '.join(sorted(keys)[:shown])}{f' and {len(keys) - shown} more' if len(keys) > shown else ''}"


def numbered_children(shapes: Mapping[str, tuple[int, ...]], prefix: str, template: Mapping[str, tuple[int, ...]]) -> int:
    """How many sub-modules `<prefix>0.`, `<prefix>1.`, ... the state-dict shapes hold, each with exactly the
    template's tensors and shapes (so each one counted is backed by the file's bytes); ValueError naming a gap in the
    numbers or a sub-module that does not fit."""
    children: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        number, _, rest = key[len(prefix):].partition(".")  # rest: the tensor's name inside the sub-module
        if key.startswith(prefix) and number.isdecimal() and rest:
            children.setdefault(int(number), {})[key] = shape
    if sorted(children) != list(range(len(children))):
        numbers = sorted(children)
        shown = ", ".join(map(str, numbers[:6])) + (", ..." if len(numbers) > 6 else "")
        raise ValueError(f"the sub-modules {prefix} are numbered {shown}, not 0 to {len(numbers) - 1}")
    for number, child in sorted(children.items()):
        problems = shape_differences({f"{prefix}{number}.{key}": shape for key, shape in template.items()}, child)
        if problems:
            raise ValueError(f"sub-module {prefix}{number} does not fit: {'; '.join(problems)}")
    return len(children)


def shape_differences(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Missing, unexpected and wrongly shaped tensors, each in a few words."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    return ([f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"] if missing else []) + \
        ([f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}"] if unexpected else []) + \
        [f"{key} has shape {tuple(found[key])}, expected {tuple(shape)}"
         for key, shape in expected.items() if key in found and tuple(found[key]) != tuple(shape)][:4]

