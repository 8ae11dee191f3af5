"""A digest of a model's weights, for telling base models apart.

An adapter is only meaningful on the weights it was trained on, so its manifest names them by
:func:`weights_digest`. The digest is taken over the *tensors* (name, dtype, shape and raw bytes, in
name order), read straight from the safetensors files, and not over the files themselves: a fresh
conversion of the same model may write other file metadata (the header's ``__metadata__``), another
sharding or another tensor order, and the digest must not change with them.

The safetensors format is small and documented (https://github.com/huggingface/safetensors#format):
8 bytes little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}}``, then the data, offsets relative to the end of the header. It
is read here directly, because no tensor framework reads every dtype as raw bytes (numpy has no
bfloat16), and streamed so that a large tensor is never held in memory whole.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from alignd.errors import ModelPreparationError

INDEX_FILE = "model.safetensors.index.json"
_CHUNK = 8 * 1024 * 1024
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit on the JSON header


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of the model in ``folder``: those its index names when it is sharded,
    else every ``*.safetensors`` file at its top level."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelPreparationError(f"model folder {folder} does not exist")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelPreparationError(f"{index} is not a safetensors index: {exc}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelPreparationError(f"{folder} holds no safetensors weights (*.safetensors)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelPreparationError(f"{folder}: the index names weight files that are missing: {missing}")
    return files


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data begins."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ModelPreparationError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER:
            raise ModelPreparationError(f"{path} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelPreparationError(f"{path} is not a safetensors file: {exc}") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def weights_digest(folder: str | Path) -> str:
    """SHA-256 (hex) over every tensor of the model in ``folder``, in name order: for each, its name,
    dtype, shape and raw bytes. Independent of file names, sharding, tensor order within files and
    file metadata; two folders have the same digest exactly when they hold the same tensors."""
    tensors: dict[str, tuple[Path, int, dict]] = {}
    for path in weight_files(folder):
        header, data_start = _read_header(path)
        for name, entry in header.items():
            if name in tensors:
                raise ModelPreparationError(f"tensor {name!r} appears twice ({tensors[name][0].name}, {path.name})")
            tensors[name] = (path, data_start, entry)
    digest = hashlib.sha256()
    handles: dict[Path, object] = {}
    try:
        for name in sorted(tensors):
            path, data_start, entry = tensors[name]
            begin, end = (int(x) for x in entry["data_offsets"])
            # Lengths make the byte stream unambiguous (no name or shape can run into the next field).
            described = json.dumps([name, entry["dtype"], list(entry["shape"]), end - begin]).encode()
            digest.update(struct.pack("<Q", len(described)))
            digest.update(described)
            handle = handles.get(path) or handles.setdefault(path, open(path, "rb"))
            handle.seek(data_start + begin)
            remaining = end - begin
            while remaining:
                block = handle.read(min(_CHUNK, remaining))
                if not block:
                    raise ModelPreparationError(f"{path} is truncated (tensor {name!r})")
                digest.update(block)
                remaining -= len(block)
    finally:
        for handle in handles.values():
            handle.close()
    return digest.hexdigest()
