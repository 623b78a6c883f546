"""Property-based fuzzing of the weight readers: whatever bytes a checkpoint holds, reading it ends in a
clean refusal (``ValueError`` or ``FileNotFoundError``, one line naming the file) or in a correct load
(every tensor loaded is the file's), never in another exception, and never in a model far larger
than the file's tensors (what a damaged header or config declares is not allocated).

Each property starts from a valid file of a tiny MAE (8 px, 8 wide, 2 blocks) and mutates it:
safetensors headers (length field, JSON bytes, dtypes, shapes, offsets, metadata, names; truncation),
Hugging Face ``config.json`` values, and official ``.pth`` structures (``{'model': ...}`` with
tensors of other shapes and types, values that are not tensors, odd ``args``). Hypothesis runs
derandomized (the same examples every run), without a database.
"""

from __future__ import annotations

import argparse
import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import openmae
from openmae.interop import export_pretrained, inspect_checkpoint, load, read_weights
from openmae.interop.architecture import ALLOC_MARGIN, ALLOC_SLACK

TINY = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=2, num_heads=2)
TINY.update(decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
FUZZ = settings(
    derandomize=True,
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Sizes a mutation draws: the edges and the absurd, plus small ones that may make a consistent file.
SIZES = st.sampled_from([0, 1, 2, 3, 4, 7, 8, 16, 32, -1, 2**31, 2**40, 10**12]) | st.integers(0, 40)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | SIZES | st.floats(allow_nan=False, width=32) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
# names that lead the readers down every path: other blocks, the decoder, ConvMAE, Swin, Hugging Face, timm heads
NAMES = st.sampled_from(
    [
        "blocks.7.norm1.weight",
        "blocks.0.mlp.fc1.weight",
        "pos_embed",
        "decoder_embed.weight",
        "decoder_blocks.3.norm1.weight",
        "patch_embed1.proj.weight",
        "layers.0.blocks.0.attn.relative_position_bias_table",
        "vit.embeddings.cls_token",
        "vit.encoder.layer.0.attention.attention.query.weight",
        "head.weight",
        "fc_norm.weight",
        "module.cls_token",
        "encoder.layers.0.blocks.0.norm1.weight",
    ]
) | st.text(max_size=12)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Base(dict):
    """The valid files mutants start from (a short repr: Hypothesis prints its arguments on failure)."""

    def __repr__(self) -> str:
        return "<base files>"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    """A tiny MAE as openmae safetensors, Hugging Face folder and official .pth; a folder for the mutants."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    mae = openmae.create_model("mae_vit_tiny_patch4", **TINY)
    data = export_pretrained(mae, root / "mae.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    export_pretrained(mae, root / "hf", format="hf")
    return Base(
        dir=root,
        bytes=data,
        header=json.loads(data[8 : 8 + length]),
        body=data[8 + length :],
        hf_config=json.loads((root / "hf" / "config.json").read_text()),
        state={k: v.clone() for k, v in mae.state_dict().items()},
    )


def check_reader(path: Path, named: Path | None = None) -> None:
    """``load`` and ``inspect_checkpoint`` refuse ``path`` cleanly (one line naming ``named``, the file by
    default) or load it correctly: the tensors loaded are the file's, the model no larger than it justifies."""
    named = named or path
    try:
        model, report = load(path)
    except (ValueError, FileNotFoundError) as e:
        message = str(e)
        assert str(named) in message, message
        assert "\n" not in message, message
        return
    weights = read_weights(path)
    own = model.state_dict()
    for key in report.loaded:
        if key in weights.state:
            expected = weights.state[key].to(own[key].dtype)
            torch.testing.assert_close(own[key], expected, rtol=0, atol=0, equal_nan=True)
    held = sum(t.numel() for t in (*weights.state.values(), *weights.extras.values()))
    assert sum(t.numel() for t in own.values()) <= ALLOC_MARGIN * held + ALLOC_SLACK
    info = inspect_checkpoint(path)  # what loads, inspects
    assert info["mismatched"] == [] and info["unexpected"] == []


def _safetensors(header: object, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# -- safetensors ---------------------------------------------------------------------------------


@st.composite
def mutated_headers(draw, header: dict) -> object:
    """The header with one to three mutations: a tensor's dtype, shape, offsets or name; the tensor
    dropped or replaced by any JSON; the metadata, or one entry of the openmae record's config."""
    header = copy.deepcopy(header)
    tensors = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "rename", "entry", "metadata", "config"]))
        name = draw(st.sampled_from(tensors))
        if not isinstance(header.get(name), dict):  # dropped or replaced by an earlier mutation
            continue
        if kind == "dtype":
            dtypes = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "Q4", 3]
            header[name]["dtype"] = draw(st.sampled_from(dtypes))
        elif kind == "shape":
            header[name]["shape"] = draw(st.lists(SIZES, max_size=4))
        elif kind == "offsets":
            header[name]["data_offsets"] = draw(st.lists(SIZES, max_size=3))
        elif kind == "drop":
            del header[name]
        elif kind == "rename":
            header[draw(NAMES)] = header.pop(name)
        elif kind == "entry":
            header[name] = draw(JSON_VALUES)
        elif kind == "metadata":
            header["__metadata__"] = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8)) | JSON_VALUES)
        elif isinstance(header.get("__metadata__"), dict) and "openmae" in header["__metadata__"]:
            record = json.loads(header["__metadata__"]["openmae"])
            keys = [*TINY, "mlp_ratio", "norm_eps", "mask_type", "bogus"]
            record["config"][draw(st.sampled_from(keys))] = draw(JSON_VALUES)
            header["__metadata__"]["openmae"] = json.dumps(record)
    return header


@FUZZ
@given(data=st.data())
def test_mutated_safetensors_headers(base, data):
    header = data.draw(mutated_headers(base["header"]))
    blob = _safetensors(header, base["body"])
    cut = data.draw(st.none() | st.integers(0, len(blob)))
    path = base["dir"] / "mutant.safetensors"
    path.write_bytes(blob if cut is None else blob[:cut])
    check_reader(path)


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6),
    length=st.none() | st.sampled_from([0, 1, 7, 2**32, 2**63, 2**64 - 1]) | st.integers(0, 20000),
)
def test_corrupted_safetensors_bytes(base, flips, length):
    """Bytes overwritten in the header-length field and the JSON header; or a false length."""
    blob = bytearray(base["bytes"])
    for at, value in flips:
        blob[at] = value
    if length is not None:
        blob[:8] = struct.pack("<Q", length)
    path = base["dir"] / "flipped.safetensors"
    path.write_bytes(bytes(blob))
    check_reader(path)


def test_a_header_declaring_a_huge_tensor_allocates_nothing(base):
    """10^12 float32 values declared, with offsets to match, in a file of a few kilobytes."""
    header = copy.deepcopy(base["header"])
    header["blocks.0.norm1.weight"] = {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}
    path = base["dir"] / "huge.safetensors"
    path.write_bytes(_safetensors(header, base["body"]))
    with pytest.raises(ValueError, match="huge.safetensors"):
        load(path)


@pytest.mark.parametrize("header", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 3000 + b"1" + b"}" * 3000])
def test_a_deeply_nested_header_is_refused(base, header):
    path = base["dir"] / "nested.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ValueError, match="nested.safetensors"):
        load(path)


# -- Hugging Face config.json ---------------------------------------------------------------------

HF_KEYS = [
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "decoder_hidden_size",
    "decoder_num_hidden_layers",
    "decoder_num_attention_heads",
    "decoder_intermediate_size",
    "mask_ratio",
    "norm_pix_loss",
    "hidden_dropout_prob",
]


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(HF_KEYS), JSON_VALUES | st.sampled_from(["vit_mae", "gelu", 8, 32, 1e-6])),
    whole=st.none() | JSON_VALUES.filter(lambda v: not isinstance(v, dict)),
)
def test_hf_config_values(base, changes, whole):
    config = base["hf_config"] if whole is None else whole
    if isinstance(config, dict):
        config = {**config, **changes}
    folder = base["dir"] / "hf"
    (folder / "config.json").write_text(json.dumps(config))
    try:
        check_reader(folder, named=folder)
    finally:
        (folder / "config.json").write_text(json.dumps(base["hf_config"]))


def test_hf_config_declaring_a_huge_model_is_refused_before_building(base):
    """A config.json whose sizes are each in range, but together describe a model (a 4096 x 4096 patch
    grid, 512 blocks) of far more values than the file's few thousand: refused before anything is built."""
    folder = base["dir"] / "hf"
    config = {**base["hf_config"], "num_hidden_layers": 512, "image_size": 16384}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        with pytest.raises(ValueError, match="would allocate"):
            load(folder)
    finally:
        (folder / "config.json").write_text(json.dumps(base["hf_config"]))


# -- official .pth structures -------------------------------------------------------------------


def _tensor(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype) if dtype != torch.bool else torch.ones(shape, dtype=dtype)


TENSORS = st.builds(
    _tensor,
    st.lists(st.integers(0, 9), max_size=4),
    st.sampled_from(
        [
            torch.float32,
            torch.float16,
            torch.bfloat16,
            torch.float64,
            torch.int64,
            torch.bool,
            torch.uint8,
            torch.complex64,
        ]
    ),
)
PY_VALUES = st.recursive(
    st.none() | st.booleans() | SIZES | st.text(max_size=6) | TENSORS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def official_objects(draw, state: dict) -> object:
    """An official checkpoint with its state dict mutated (tensors of other shapes and types, values
    that are not tensors, new or dropped names) and wrapped in one of the layouts readers meet."""
    state = dict(state)
    names = sorted(state)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["replace", "drop", "add"]))
        if kind == "replace":
            state[draw(st.sampled_from(names))] = draw(PY_VALUES)
        elif kind == "drop":
            state.pop(draw(st.sampled_from(names)), None)
        else:
            state[draw(NAMES | st.integers())] = draw(PY_VALUES)
    args = draw(
        st.none()
        | st.builds(
            lambda d: argparse.Namespace(**d),
            st.dictionaries(st.sampled_from(["model", "input_size", "norm_pix_loss", "mask_ratio"]), PY_VALUES),
        )
        | PY_VALUES
    )
    layout = draw(st.sampled_from(["model", "bare", "state_dict", "with_args", "openmae_record", "not_a_dict"]))
    if layout == "model":
        return {"model": state}
    if layout == "bare":
        return state
    if layout == "state_dict":
        return {"state_dict": state, "epoch": draw(PY_VALUES)}
    if layout == "with_args":
        return {"model": state, "args": args, "optimizer": {}, "epoch": 3}
    if layout == "openmae_record":  # what openmae's official export adds: the exact model, here mutated
        config = {**TINY, "norm_pix_loss": False, "mlp_ratio": 4.0}
        config.update(draw(st.dictionaries(st.sampled_from([*config, "bogus"]), PY_VALUES, max_size=2)))
        arch = draw(st.sampled_from(["mae_vit_tiny_patch4", "vit_tiny_patch4", "swin_tiny_patch4_window7", "nope", 5]))
        return {"model": state, "openmae": {"arch": arch, "config": config}}
    return draw(PY_VALUES)


@FUZZ
@given(data=st.data())
def test_official_pth_structures(base, data):
    obj = data.draw(official_objects(base["state"]))
    path = base["dir"] / "mutant.pth"
    torch.save(obj, path)
    check_reader(path)


@FUZZ
@given(cut=st.integers(0, 20000))
def test_truncated_pth(base, cut):
    full = base["dir"] / "official.pth"
    if not full.exists():
        torch.save({"model": base["state"]}, full)
    path = base["dir"] / "cut.pth"
    path.write_bytes(full.read_bytes()[:cut])
    check_reader(path)


def test_a_legacy_pth_declaring_a_huge_storage_allocates_nothing(base):
    """torch's pre-zip format: the pickle declares 10^12 elements for a 4-element storage."""
    import io

    buffer = io.BytesIO()
    torch.save({"model": {"cls_token": torch.zeros(4)}}, buffer, _use_new_zipfile_serialization=False)
    blob = buffer.getvalue()
    at = blob.find(b"K\x04N", blob.find(b"cpu"))  # the storage's element count, pickled as a small int
    assert at > 0
    path = base["dir"] / "legacy.pth"
    path.write_bytes(blob[:at] + b"\x8a\x06" + (10**12).to_bytes(6, "little") + blob[at + 2 :])
    with pytest.raises(ValueError, match="legacy.pth"):
        load(path)
