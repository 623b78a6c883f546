"""FSDP (FSDP2, ``fully_shard``) and activation checkpointing: the same training as DDP and one process.

Two gloo processes on the CPU train a tiny MAE under FSDP, then under DDP and FSDP in turn, each
resuming the other's checkpoint, then with compiled blocks; one process trains the same global batch. All end at the same
weights (float tolerance: FSDP reduce-scatters where DDP all-reduces), and FSDP's checkpoint is the
same single file one process writes.
"""

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

import openmae
from openmae.checkpoint import checkpoint_name, load_training_state
from openmae.commands.pretrain import run_pretrain
from openmae.config import DataConfig, ModelConfig, OptimConfig, PretrainConfig, TrainConfig
from openmae.distributed import DistInfo, checkpoint_activations, parallelize, transformer_blocks
from openmae.io import read_safetensors
from openmae.optim import build_adamw, param_groups

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 16, "decoder_depth": 1,
              "decoder_num_heads": 2, "patch_size": 4}
CONVMAE = dict(embed_dim=(16, 32, 48), depth=(1, 1, 2), num_heads=2, decoder_embed_dim=16, decoder_depth=1,
               decoder_num_heads=2)
STEPS = 4  # 128 images, global batch 32
TIMEOUT_S = 240  # both ranks, four short runs: two cold torch imports (~10 s each on 2 busy cores), then seconds a run


def config(out: Path, batch_size: int, **train) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(name="mae_vit_tiny_patch4", kwargs=dict(TINY_MODEL)),
        data=DataConfig(name="digits", img_size=16, limit=128, num_workers=0),
        optim=OptimConfig(warmup_epochs=0.5, base_lr=1e-3),
        train=TrainConfig(**{"epochs": 1, "batch_size": batch_size, "precision": "fp32", "device": "cpu",
                             "output_dir": str(out), "progress": False, "log_every": 1, "save_every_steps": 2,
                             **train}),
    )


def _rank_runs(root: str) -> None:
    """What ranks 0 and 1 run (``python -c``): per-process batch 8 x 2 accumulated, a global batch of
    32. A straight FSDP run, then a chain of strategies: DDP resumes FSDP's step-2 checkpoint and
    stops at step 3, FSDP with activation checkpointing resumes that and finishes."""
    root = Path(root)
    run_pretrain(config(root / "fsdp", 8, accum_steps=2, strategy="fsdp"))
    run_pretrain(config(root / "ddp_from_fsdp", 8, accum_steps=2, strategy="ddp", max_steps=3, recon_every=0,
                        resume=str(root / "fsdp" / checkpoint_name(2))))
    run_pretrain(config(root / "fsdp_from_ddp", 8, accum_steps=2, strategy="fsdp", activation_checkpointing=True,
                        recon_every=0, resume=str(root / "ddp_from_fsdp" / checkpoint_name(3))))
    _compiled_blocks(root)


def _compiled_blocks(root: Path) -> None:
    """FSDP with every block compiled (and checkpointed) trains as FSDP without: two steps each,
    the gathered weights saved by rank 0. The aot_eager backend traces what inductor would compile
    (graphs, recomputation, FSDP's hooks left outside) without minutes of C++ builds."""
    compile_ = torch.compile
    torch.compile = functools.partial(compile_, backend="aot_eager")
    rank = dist.get_rank()
    try:
        for name, fancy in (("fsdp_plain", False), ("fsdp_compiled", True)):
            torch.manual_seed(0)
            model = openmae.create_model("mae_vit_tiny_patch4", **dict(TINY_MODEL, img_size=16))
            parallel = parallelize(model, DistInfo(rank, 2), torch.device("cpu"), strategy="fsdp", compile=fancy,
                                   activation_checkpointing=fancy)
            opt = build_adamw(param_groups(model, 0.05, model.no_weight_decay()), 1e-3, (0.9, 0.95))
            for step in range(2):
                torch.manual_seed(10 * step + rank)  # each rank its own images and masks
                parallel.module(torch.randn(4, 1, 16, 16), mask_ratio=0.75).loss.backward()
                opt.step()
                opt.zero_grad()
            state, _ = parallel.state_dicts(opt)
            if rank == 0:
                save_file(state, str(root / f"{name}.safetensors"))
    finally:
        torch.compile = compile_


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_ranks(root: Path) -> None:
    """:func:`_rank_runs` as ranks 0 and 1 of a gloo group (torchrun's variables, without its agent)."""
    port = _free_port()
    code = f"from tests.test_fsdp import _rank_runs; _rank_runs({str(root)!r})"
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        results = [p.communicate(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [p.communicate()[1][-3000:] for p in procs]
        pytest.fail(f"a rank hung (killed after {TIMEOUT_S} s); stderr tails:\n" + "\n---\n".join(tails))
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]
        assert "Traceback" not in err, err[-4000:]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def assert_close(a: dict, b: dict, what: str, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-4), f"{what}: {k}"


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_fsdp_ddp_and_one_process_train_alike_and_share_checkpoints(tmp_path, one_thread):
    single = tmp_path / "single"
    run_pretrain(config(single, 32, save_every_steps=1, keep_checkpoints=4))
    _launch_two_ranks(tmp_path)

    reference = weights(single / "model.safetensors")
    for name in ("fsdp", "fsdp_from_ddp"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["steps"] == STEPS and summary["world_size"] == 2 and summary["effective_batch"] == 32
        assert_close(weights(tmp_path / name / "model.safetensors"), reference, name)
    # DDP's step-3 checkpoint, resumed from FSDP's step 2, equals one process's
    assert_close(load_training_state(tmp_path / "ddp_from_fsdp" / checkpoint_name(3))["model"],
                 load_training_state(single / checkpoint_name(3))["model"], "ddp_from_fsdp")
    assert_close(weights(tmp_path / "fsdp_compiled.safetensors"), weights(tmp_path / "fsdp_plain.safetensors"),
                 "compiled blocks")
    # the hooks ran on the full model gathered from the shards (rank 0 alone draws it)
    assert (tmp_path / "fsdp" / "reconstructions" / "epoch_0001.png").exists()

    # FSDP's checkpoint is the file one process writes: the same keys, optimizer slots and step
    ckpt2 = checkpoint_name(2)
    sharded, plain = load_training_state(tmp_path / "fsdp" / ckpt2), load_training_state(single / ckpt2)
    assert_close(sharded["model"], plain["model"], "checkpoint weights")
    assert sharded["optimizer"]["state"].keys() == plain["optimizer"]["state"].keys()
    for pid, slots in plain["optimizer"]["state"].items():
        assert_close(sharded["optimizer"]["state"][pid], slots, f"optimizer state {pid}")
    assert sharded["optimizer"]["param_groups"] == plain["optimizer"]["param_groups"]
    assert sharded["info"]["step"] == 2 and sharded["info"]["config"]["train"]["strategy"] == "fsdp"

    # and one process resumes it (per-process batch 8 x 2 as saved: 8 steps an epoch on one process)
    resumed = tmp_path / "one_from_fsdp"
    summary = run_pretrain(config(resumed, 8, accum_steps=2, resume=str(tmp_path / "fsdp" / ckpt2), recon_every=0))
    steps = [json.loads(line).get("step") for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 8 and summary["world_size"] == 1 and steps[0] == 3


# -- activation checkpointing, one process ----------------------------------------------------------


def _grads(model: torch.nn.Module, images: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # masks / drop path draw the same
    out = model(images, **kwargs)
    loss = out.loss if hasattr(out, "loss") else out.logsumexp(-1).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, kwargs, call", [
    ("mae_vit_tiny_patch4", dict(TINY_MODEL, img_size=16, in_chans=3), {"mask_ratio": 0.75}),
    ("vit_tiny_patch16", dict(img_size=32, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.3), {}),
    ("convmae_tiny_patch16", dict(CONVMAE, img_size=32), {"mask_ratio": 0.75}),
])
def test_activation_checkpointing_gives_the_same_gradients(name, kwargs, call):
    """Recomputed blocks give the gradients of stored ones; drop path (vit) replays the same draws."""
    torch.manual_seed(0)
    model = openmae.create_model(name, **kwargs)
    model.train()
    checkpointed = openmae.create_model(name, **kwargs)
    checkpointed.load_state_dict(model.state_dict())
    checkpointed.train()
    checkpoint_activations(checkpointed)
    assert checkpointed.state_dict().keys() == model.state_dict().keys()  # names, so checkpoints, unchanged

    images = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    ref, got = _grads(model, images, **call), _grads(checkpointed, images, **call)
    assert ref.keys() == got.keys() and ref
    for k in ref:
        assert torch.allclose(ref[k], got[k], atol=1e-6, rtol=1e-5), k


def test_activation_checkpointing_recomputes_each_block():
    """Each block's forward runs again in the backward pass (so the memory saving is real)."""
    model = openmae.create_model("mae_vit_tiny_patch4", **dict(TINY_MODEL, img_size=16, in_chans=3))
    blocks = transformer_blocks(model)
    assert len(blocks) == TINY_MODEL["depth"] + TINY_MODEL["decoder_depth"]
    checkpoint_activations(model)
    calls = []
    for block in blocks:  # the first op: recomputing stops once the saved tensors are back
        block.norm1.register_forward_hook(lambda *_: calls.append(1))
    out = model(torch.randn(2, 3, 16, 16), mask_ratio=0.75)
    assert len(calls) == len(blocks)
    out.loss.backward()
    assert len(calls) == 2 * len(blocks)


def test_blocks_of_every_family():
    """FSDP's units: the transformer blocks of ViT / MAE, ConvMAE's conv and transformer stages, Swin."""
    mae = openmae.create_model("mae_vit_tiny_patch4", **dict(TINY_MODEL, img_size=16, in_chans=3))
    assert transformer_blocks(mae) == [*mae.blocks, *mae.decoder_blocks]
    conv = openmae.create_model("convmae_tiny_patch16", **dict(CONVMAE, img_size=32))
    assert transformer_blocks(conv) == [*conv.blocks1, *conv.blocks2, *conv.blocks3, *conv.decoder_blocks]
    swin = openmae.create_model("simmim_swin_micro_patch4_window7")
    assert len(transformer_blocks(swin)) == sum(len(stage.blocks) for stage in swin.layers)

