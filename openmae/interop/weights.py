"""What every reader shares: a checkpoint as :class:`Weights` in openmae's parameter names, the
:class:`LoadReport` of loading it, and safe ways to open weight files.

Nothing here unpickles code: ``.pth``/``.bin`` files go through ``torch.load(weights_only=True)``
with one extra allowed class, the ``argparse.Namespace`` that official MAE checkpoints carry.

Nothing here trusts a file either: a truncated or corrupt file, JSON that is not an object, a state
dict with other keys than names or a shard path that leaves its folder is a ``ValueError`` naming the
file and what is wrong, raised before anything is built from it.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from openmae.io import read_safetensors, read_safetensors_metadata

FORMATS = ("openmae", "official", "hf", "timm")
# Fixed sin-cos tables: recomputed, never trained, so a file need not carry them.
FIXED = ("pos_embed", "decoder_pos_embed")
DECODER_PREFIXES = (
    "decoder_embed.",
    "mask_token",
    "decoder_pos_embed",
    "decoder_blocks.",
    "decoder_norm.",
    "decoder_pred.",
    "decoder_pred_pixel.",
)
CLASSIFIER_PREFIXES = ("head.", "fc_norm.")
# What only reconstruction needs: MAE's decoder, and ConvMAE's fusion of the early stages into it.
DECODER_PARTS = DECODER_PREFIXES + ("stage1_output_decode.", "stage2_output_decode.")
# A config.json or shard index is a few kilobytes; anything this large is not one.
MAX_JSON_BYTES = 64 * 2**20


class UnsafeCheckpointError(ValueError):
    """The file needs code, not just tensors and plain containers, to be unpickled."""


@dataclass
class Weights:
    """A checkpoint in openmae's parameter names.

    Attributes:
        source: the path read.
        format: ``openmae``, ``official``, ``hf`` or ``timm``.
        kind: what the file holds, in words ("training checkpoint (epoch 399)", "encoder only", ...).
        state: tensors under openmae names (``blocks.0.attn.qkv.weight``, ``decoder_pred.bias``, ...).
        arch: registered model name the file records, if any.
        config: constructor arguments the file records (not those guessed from shapes).
        extras: tensors an MAE has no place for, e.g. a fine-tuned ``head.weight`` / ``fc_norm.*``.
        notes: what a user should know (defaults assumed, parts absent).
        mask_ratio: the mask ratio the file records, if any.
        complete: ``arch`` and ``config`` are openmae's own record (nothing to infer).
        origin: where the file declares each ``config`` entry (``config.json hidden_size``), for messages.
    """

    source: str
    format: str
    kind: str
    state: dict[str, Tensor]
    arch: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    mask_ratio: float | None = None
    complete: bool = False
    origin: dict[str, str] = field(default_factory=dict)

    @property
    def has_decoder(self) -> bool:
        """MAE's decoder, or SimMIM's pixel head."""
        return "decoder_embed.weight" in self.state or "decoder_pred.weight" in self.state


PARTIAL_NOTE = "loaded partially (allow_partial)"  # how LoadReport.partial_line() finds its note


@dataclass
class LoadReport:
    """What a load did: which tensors went where, what stayed at its initial value, and why."""

    source: str
    format: str
    kind: str
    arch: str
    config: dict[str, Any]
    loaded: list[str]
    missing: list[str]  # model parameters left at their initial values
    ignored: list[str]  # file tensors the model did not take
    notes: list[str]
    extras: dict[str, Tensor] = field(default_factory=dict)
    mask_ratio: float | None = None
    has_decoder: bool = False
    norm_pix_loss: bool | None = None  # None: the file does not say

    def partial_line(self) -> str | None:
        """The one line saying what an ``allow_partial`` load accepted, None when it accepted nothing."""
        return next((n for n in self.notes if n.startswith(PARTIAL_NOTE)), None)

    def summary(self) -> str:
        lines = [
            f"{self.source}: {self.format} ({self.kind}) -> {self.arch}",
            f"  loaded {len(self.loaded)} tensors; missing {len(self.missing)}; ignored {len(self.ignored)}",
        ]
        if self.missing:
            lines.append("  missing: " + abbrev(self.missing))
        if self.ignored:
            lines.append("  ignored: " + abbrev(self.ignored))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = summary


def plural(n: int, noun: str) -> str:
    """``1 tensor``, ``2 tensors``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def abbrev(names: list[str], limit: int = 6) -> str:
    """The first ``limit`` names and how many more; a name with line breaks or control characters in quotes."""
    more = f" ... (+{len(names) - limit})" if len(names) > limit else ""
    return ", ".join(n if n.isprintable() else repr(n) for n in names[:limit]) + more


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` on one line of at most ``limit`` characters: a value read from a file, in a message."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- reading files safely --------------------------------------------------------------------


def _reason(error: BaseException) -> str:
    """The first sentence of an exception's message (its type when it says nothing), for a one-line error."""
    text = str(error)
    if m := re.search(r"tried to allocate (\d+) bytes", text):  # torch's old format: a storage size read from the file
        return f"it declares a {int(m.group(1)):,}-byte tensor that it does not hold"
    lines = text.strip().splitlines()
    line = lines[0].strip().split(". ")[0] if lines else ""
    if not line or line.isdigit() or line.startswith("'"):  # KeyError('101'), EOFError(): say what it is
        line = f"{type(error).__name__}{': ' + line if line else ''}"
    return line if len(line) <= 160 else line[:157] + "..."


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder where a weights file was expected; point at the file inside it")


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` that only rebuilds tensors, plain containers and ``argparse.Namespace``.

    Raises:
        UnsafeCheckpointError: the pickle references anything else (for example ``os.system``), or
            is not one ``torch.load(weights_only=True)`` reads; nothing from the file is executed.
        ValueError: the file is truncated or corrupt (the message names it and says why).
        FileNotFoundError: there is no such file.
    """
    path = Path(path)
    _check_readable(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines()]
        found = next((line for line in lines if "GLOBAL" in line or "global" in line), "")
        if found:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: unpickling it would need code beyond tensors and plain containers "
                f"({found}). openmae never runs code from a checkpoint; if you trust the file's source, load it "
                "yourself and save its state dict as safetensors."
            ) from None
        op = next((line for line in lines if line.startswith("Unsupported operand")), _reason(e))
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it is not a torch.save file that loads without running code ({op}: a "
            "plain pickle, or not a checkpoint at all). openmae never runs code from a checkpoint; if you trust "
            "the file's source, load it yourself and save its state dict as safetensors."
        ) from None
    except PermissionError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or _reason(e)}; check its permissions") from None
    except Exception as e:  # noqa: BLE001 -- torch's reader fails on damaged bytes in many ways (zip, EOF, struct, ...)
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt: {_reason(e)}); re-save it or "
            "point to another checkpoint"
        ) from None


def read_safetensors_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a damaged one is a ``ValueError`` naming it."""
    path = Path(path)
    _check_readable(path)
    try:
        return read_safetensors(path)
    except (SafetensorError, RecursionError) as e:  # RecursionError: a header of deeply nested JSON
        raise _bad_safetensors(path, e) from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or _reason(e)}; check that it is a readable file") from None


def safetensors_header(path: str | Path) -> tuple[dict[str, str], list[str]]:
    """(metadata, tensor names) of a safetensors file, without reading its tensors."""
    path = Path(path)
    _check_readable(path)
    try:
        meta = read_safetensors_metadata(path)
        with safe_open(str(path), framework="pt") as f:
            return meta, list(f.keys())
    except (SafetensorError, RecursionError) as e:  # RecursionError: a header of deeply nested JSON
        raise _bad_safetensors(path, e) from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or _reason(e)}; check that it is a readable file") from None


def _bad_safetensors(path: Path, error: Exception) -> ValueError:
    reason = _reason(error).removeprefix("Error while deserializing header: ")
    return ValueError(
        f"{path} is not a readable safetensors file (truncated or corrupt: {reason}); re-save it or point to "
        "another checkpoint"
    )


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold an object (``config.json``, a shard index); anything else is a
    ``ValueError`` naming the file and what is wrong."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(
                f"{path} is {path.stat().st_size:,} bytes, too large for a JSON config; is it the right file?"
            )
        text = path.read_text(encoding="utf-8")
        obj = json.loads(text)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or _reason(e)}; check that it is a readable file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not JSON (not UTF-8 text); fix it or remove it") from None
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix it or remove it"
        ) from None
    except RecursionError:
        raise ValueError(f"{path} is not a JSON config (nested too deeply); fix it or remove it") from None
    if not isinstance(obj, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")
        raise ValueError(f"{path} holds {kind}, not a JSON object; fix it or remove it")
    return obj


# -- values a file declares -------------------------------------------------------------------


def declared_int(value: Any, what: str, minimum: int = 1) -> int:
    """A whole number >= ``minimum`` that a file declares (``what`` names it, e.g. ``config.json hidden_size``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"{what} is {shown(value)}, not a whole number >= {minimum}; fix that entry or re-export the file"
        )
    return value


def declared_float(value: Any, what: str, low: float, high: float, high_open: bool = False) -> float:
    """A finite number in [low, high] (or [low, high) with ``high_open``) that a file declares."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or value > high or (high_open and value == high):
        bracket = ")" if high_open else "]"
        raise ValueError(
            f"{what} is {shown(value)}, not a number in [{low}, {high}{bracket}; fix that entry or re-export the file"
        )
    return float(value)


def declared_size(value: Any, what: str) -> int | tuple[int, int]:
    """An image size a file declares: one side, or a (height, width) pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(
                f"{what} is {shown(value)}, not a size or a (height, width) pair; fix that entry or re-export the file"
            )
        return declared_int(value[0], what), declared_int(value[1], what)
    return declared_int(value, what)


def tensor_dict(obj: Any, source: str | Path, where: str = "the file") -> dict[str, Tensor]:
    """The tensors of a state dict read from a file: names to dense tensors. Other values beside them
    (an ``epoch`` counter, say) are left out; anything that is not a state dict is refused."""
    obj = pickled_dict(obj, source if where == "the file" else f"{source} ({where})")
    out = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    odd = [k for k, v in out.items() if v.layout != torch.strided or v.is_quantized or v.is_meta or v.is_complex()]
    if odd:
        raise ValueError(
            f"{source}: tensors {abbrev(odd, 3)} are not dense real tensors; re-save the weights as plain tensors"
        )
    return out


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Drop ``prefix`` (e.g. DDP's ``module.``) when every key carries it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def is_hf_state(keys: Any) -> bool:
    """Hugging Face ViTMAE names (both transformers 4 and 5)."""
    return any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.", "decoder.decoder_")) for k in keys)


def is_vit_state(keys: Any) -> bool:
    """Official MAE / timm / openmae names."""
    return any(k == "patch_embed.proj.weight" or k.startswith("blocks.") for k in keys)


def split_classifier(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Separate the fine-tuned classifier's ``head.*`` / ``fc_norm.*`` from the trunk."""
    extras = {k: v for k, v in state.items() if k.startswith(CLASSIFIER_PREFIXES)}
    return {k: v for k, v in state.items() if k not in extras}, extras


def describe(state: dict[str, Tensor], extras: dict[str, Tensor]) -> str:
    if any(k.startswith("head.") and k.endswith("weight") for k in extras):
        return "fine-tuned classifier"
    if "decoder_embed.weight" in state:
        return "encoder + decoder"
    return "encoder only"


def find_weights_file(folder: Path) -> Path | None:
    for name in (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ):
        if (folder / name).exists():
            return folder / name
    return None


def read_index(index_path: Path) -> tuple[dict[str, str], list[Path]]:
    """(tensor name -> shard, the shard files) of a ``*.index.json``, each shard checked to stay in the
    index's folder."""
    index = read_json_object(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no weight_map (tensor name -> shard file); not a shard index")
    shards = []
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.strip():
            raise ValueError(f"{index_path}: weight_map entry {tensor!r} names no shard file ({shard!r})")
        parts = PurePosixPath(shard.replace("\\", "/")).parts
        if PurePosixPath(shard).is_absolute() or PureWindowsPath(shard).is_absolute() or PureWindowsPath(shard).drive:
            raise ValueError(
                f"{index_path}: weight_map entry {tensor!r} points at {shard!r}, an absolute path; shards must "
                "lie in the index's own folder"
            )
        if ".." in parts:
            raise ValueError(
                f"{index_path}: weight_map entry {tensor!r} points at {shard!r}, outside the index's folder; "
                "shards must lie in the index's own folder"
            )
        if shard.endswith(".index.json"):
            raise ValueError(
                f"{index_path}: weight_map entry {tensor!r} points at another index ({shard!r}); shards are "
                "weight files"
            )
        shards.append(shard)
    # symlinks inside the folder are followed (the Hugging Face cache links its snapshots to blobs)
    return weight_map, [index_path.parent / name for name in sorted(set(shards))]


def read_state_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors (and safetensors metadata) of one weights file, or of all shards of an index. A pickled
    file gives its top-level dict as it is (readers unwrap ``model`` / ``state_dict`` and keep the
    tensors with :func:`tensor_dict`)."""
    if path.name.endswith(".index.json"):
        state: dict[str, Tensor] = {}
        expected, shards = read_index(path)
        for shard in shards:
            if not shard.exists():
                raise FileNotFoundError(f"{path} names shard {shard.name}, which is not in {path.parent}")
            state.update(read_state_file(shard)[0])
        absent = [k for k in expected if k not in state]
        if absent:
            raise ValueError(
                f"{path}: {plural(len(absent), 'tensor')} its weight_map lists in no shard ({abbrev(absent)}); a shard "
                "is missing or damaged: download the checkpoint again"
            )
        return state, {}
    if path.suffix == ".safetensors":
        return read_safetensors_file(path)
    return pickled_dict(safe_torch_load(path), path), {}


def pickled_dict(obj: Any, source: str | Path) -> dict[str, Any]:
    """The top level of an unpickled checkpoint: a dict with string keys, or a ``ValueError``."""
    if not isinstance(obj, dict):
        raise ValueError(
            f"{source}: expected a dict of tensors, found {type(obj).__name__}; not a checkpoint openmae reads"
        )
    odd = [k for k in obj if not isinstance(k, str)]
    if odd:
        raise ValueError(
            f"{source} has keys that are not names ({abbrev([repr(k) for k in odd], 3)}); not a state dict"
        )
    return obj
