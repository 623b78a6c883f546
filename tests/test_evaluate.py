"""Evaluation protocols on tiny models: fine-tuning (full, partial), linear probing, kNN, features.

Every run uses the 8x8 digits upsampled to 16 px, a 2-block 32-wide ViT and one epoch, so a
protocol end to end takes a second or two; the encoder "checkpoint" is a randomly initialised MAE
saved in each format (what matters here is where tensors go, not how good they are).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import openmae
from openmae.cli import main
from openmae.commands.embed import embed_folder
from openmae.commands.finetune import run_finetune
from openmae.commands.knn import run_knn
from openmae.commands.linprobe import run_linprobe
from openmae.config import ConfigError, DataConfig, from_dict, load_recipe
from openmae.eval_config import (
    EncoderConfig,
    EvalSettings,
    FinetuneConfig,
    FinetuneData,
    FinetuneOptim,
    FinetuneSettings,
    FinetuneTrain,
    KNNConfig,
    KNNSettings,
    LinprobeConfig,
    LinprobeData,
    LinprobeTrain,
    ProbeEncoderConfig,
    RunSettings,
)
from openmae.hooks import KNNMonitor
from openmae.inference import knn_classify, topk_correct
from openmae.io import read_safetensors
from openmae.tasks import FinetuneTask, LinearProbeTask

ENCODER = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
MAE = dict(ENCODER, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
DIGITS = dict(name="digits", img_size=16, limit=128, num_workers=0)
FAST = dict(epochs=1, batch_size=32, precision="fp32", progress=False, log_every=1)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mae_file(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    mae = openmae.create_model("mae_vit_tiny_patch4", **MAE)
    return openmae.save_pretrained(mae, tmp_path_factory.mktemp("mae") / "mae.safetensors")


def finetune_cfg(out: Path, checkpoint, **finetune) -> FinetuneConfig:
    return FinetuneConfig(
        model=EncoderConfig(checkpoint=str(checkpoint) if checkpoint else None, drop_path_rate=0.1),
        data=FinetuneData(**DIGITS, augment="rrc"),  # the recipe: RandAugment, random erasing
        optim=FinetuneOptim(base_lr=1e-2, warmup_epochs=0.25),
        train=FinetuneTrain(output_dir=str(out), **FAST),
        finetune=FinetuneSettings(**finetune),
        eval=EvalSettings(every=1),
    )


def linprobe_cfg(out: Path, checkpoint, **model) -> LinprobeConfig:
    return LinprobeConfig(
        model=ProbeEncoderConfig(checkpoint=str(checkpoint) if checkpoint else None, **model),
        data=LinprobeData(**DIGITS),
        train=LinprobeTrain(output_dir=str(out), **FAST),
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


# -- the classifier ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in openmae.list_models("vit_") if n.startswith("vit_")])
def test_every_classifier_forward_backward(name):
    img = 28 if "patch14" in name else 16 if "patch4" in name else 32
    kw = dict(img_size=img, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    model = openmae.create_model(name, **kw, drop_path_rate=0.1)
    x = torch.randn(2, model.in_chans, *model.img_size)
    logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.arch == name and model.config["num_classes"] == 5


def test_classifier_layouts_follow_timm_and_official_names():
    avg = openmae.create_model("vit_tiny_patch4", **ENCODER)  # global pool + fc_norm replaces the final norm
    keys = set(avg.state_dict())
    assert {"fc_norm.weight", "head.weight"} <= keys and not any(k.startswith("norm.") for k in keys)
    probe = openmae.create_model("vit_tiny_patch4", **ENCODER, global_pool="token", head_norm=True)
    keys = set(probe.state_dict())
    assert {"norm.weight", "head.0.running_mean", "head.1.weight"} <= keys and "fc_norm.weight" not in keys
    assert not probe.head[0].affine and probe.head[0].eps == 1e-6
    # an MAE's config builds its classifier, and its encoder tensors load under the same names
    mae = openmae.create_model("mae_vit_tiny_patch4", **MAE)
    cls = openmae.create_model("vit_tiny_patch4", **mae.config, global_pool="token", num_classes=0)
    missing, unexpected = cls.load_state_dict(mae.state_dict(), strict=False)
    assert not missing and all(k.startswith(("decoder", "mask_token")) for k in unexpected)
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(cls.eval()(x), mae.encode(x)[:, 0])


# -- layer decay and freezing -------------------------------------------------------------------


def test_layer_decay_gives_per_block_learning_rates():
    from openmae.optim import build_adamw, set_lr

    depth, decay = 3, 0.5
    model = openmae.create_model("vit_tiny_patch4", **dict(ENCODER, depth=depth))
    task = FinetuneTask(model, FinetuneSettings(layer_decay=decay, mixup=0, cutmix=0))
    groups = task.param_groups(weight_decay=0.05)
    optimizer = build_adamw(groups, 1.0, (0.9, 0.999))
    set_lr(optimizer, 2e-3)  # what the engine does each step
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())

    def lr(name):
        return lr_of[id(named[name])]

    for i in range(depth):  # block i of D: decay^(D - i)
        for part in ("attn.qkv.weight", "mlp.fc2.bias", "norm1.weight"):
            assert lr(f"blocks.{i}.{part}") == pytest.approx(2e-3 * decay ** (depth - i))
    for stem in ("patch_embed.proj.weight", "cls_token"):  # below the first block
        assert lr(stem) == pytest.approx(2e-3 * decay ** (depth + 1))
    for top in ("head.weight", "fc_norm.bias"):
        assert lr(top) == pytest.approx(2e-3)
    assert wd_of[id(named["head.weight"])] == 0.05 and wd_of[id(named["cls_token"])] == 0.0
    assert wd_of[id(named["blocks.0.attn.qkv.bias"])] == 0.0
    assert id(named["pos_embed"]) not in lr_of  # fixed sin-cos table


def test_partial_fine_tuning_freezes_the_right_parameters(tmp_path, mae_file):
    def trained(spec):
        out = tmp_path / f"k{spec}"
        run_finetune(finetune_cfg(out, mae_file, tune_blocks=spec))
        before, after = weights(mae_file), weights(out / "model.safetensors")
        return {k for k in before if k in after and not torch.equal(before[k], after[k])}

    changed = trained("1")
    assert changed and all(k.startswith("blocks.1.") for k in changed)  # head/fc_norm are new
    assert {"blocks.1.attn.qkv.weight", "blocks.1.mlp.fc1.weight"} <= changed
    changed = trained("mlp")
    assert changed and all(k.startswith(("blocks.1.mlp.", "blocks.1.norm2.")) for k in changed)
    metrics = json.loads((tmp_path / "kmlp" / "metrics.json").read_text())
    head = 32 * 10 + 10 + 2 * 32  # head + fc_norm
    mlp = 32 * 128 + 128 + 128 * 32 + 32 + 2 * 32  # fc1, fc2, norm2
    assert metrics["trainable_parameters"] == head + mlp


def test_linear_probe_trains_only_the_head(tmp_path, mae_file):
    metrics = run_linprobe(linprobe_cfg(tmp_path, mae_file))
    before, after = weights(mae_file), weights(tmp_path / "model.safetensors")
    trunk = [k for k in after if not k.startswith("head.")]
    assert trunk and all(torch.equal(before[k], after[k]) for k in trunk)
    assert not torch.equal(after["head.0.running_mean"], torch.zeros(32))  # BatchNorm statistics were updated
    assert metrics["protocol"] == "linprobe" and metrics["pool"] == "token" and metrics["images"] == 128
    assert metrics["trainable_parameters"] == 32 * 10 + 10
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["top1"] == metrics["top1"]
    # the probe's own evaluation-only mode reads the saved classifier and gives the same numbers
    again = run_linprobe(_eval_only(linprobe_cfg(tmp_path / "eval", tmp_path / "model.safetensors")))
    assert again["eval_only"] and again["top1"] == metrics["top1"] and again["loss"] == pytest.approx(metrics["loss"])


def _eval_only(cfg):
    cfg.eval = EvalSettings(only=True)
    return cfg


def test_lars_adapts_weights_not_biases():
    model = openmae.create_model("vit_tiny_patch4", **ENCODER, global_pool="token", head_norm=True)
    task = LinearProbeTask(model, LinprobeConfig().linprobe)
    optimizer = task.build_optimizer(task.param_groups(0.0), 0.1, LinprobeConfig().optim)
    assert type(optimizer).__name__ == "Lars"
    adapt = {p.ndim: g["always_adapt"] for g in optimizer.param_groups for p in g["params"]}
    assert adapt == {2: True, 1: False}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.1.weight", "head.1.bias"}


# -- fine-tuning end to end ---------------------------------------------------------------------


def test_finetune_with_mixup_reports_and_resumes(tmp_path, mae_file):
    cfg = finetune_cfg(tmp_path, mae_file, mixup=0.8, cutmix=1.0)
    cfg.train.epochs = 2
    metrics = run_finetune(cfg)
    assert metrics["protocol"] == "finetune" and metrics["pool"] == "avg" and metrics["fc_norm"]
    assert metrics["steps"] == 8 and metrics["images"] == 128
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("test/top1" in r for r in records)  # evaluated after epoch 1 (the last one in the summary)
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    # evaluation-only mode reproduces the held-out numbers of the saved model
    again = run_finetune(_eval_only(finetune_cfg(tmp_path / "eval", tmp_path / "model.safetensors")))
    assert again["top1"] == metrics["top1"] and again["top5"] == metrics["top5"]


def test_finetune_resumes_exactly(tmp_path, mae_file):
    """RandAugment, random erasing and mixup are seeded per sample / step: a stopped and resumed
    run ends with the same weights as one that never stopped."""

    def cfg(out, **train):
        c = finetune_cfg(out, mae_file, mixup=0.8, cutmix=1.0)
        c.train = FinetuneTrain(output_dir=str(out), **{**FAST, "epochs": 2, **train})
        c.eval = EvalSettings(every=0)
        return c

    run_finetune(cfg(tmp_path / "straight"))
    run_finetune(cfg(tmp_path / "resumed", max_steps=3, save_every_steps=3))
    run_finetune(cfg(tmp_path / "resumed"))
    a, b = weights(tmp_path / "straight" / "model.safetensors"), weights(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mixup_is_seeded_per_step(mae_file):
    from openmae.data import Batch

    model = openmae.create_model("vit_tiny_patch4", **ENCODER)
    task = FinetuneTask(model, FinetuneSettings(mixup=0.8, cutmix=1.0))
    images = torch.randn(4, 1, 16, 16)

    def loss(epoch, first):
        batch = Batch(images.clone(), torch.tensor([0, 1, 2, 3]), torch.tensor([first, 7, 8, 9]), [])
        return task(model, batch, epoch)["loss"].item()

    assert loss(0, 5) == loss(0, 5)
    assert len({loss(0, 5), loss(1, 5), loss(0, 6)}) == 3


# -- kNN ----------------------------------------------------------------------------------------


def test_knn_votes_and_topk():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    scores = knn_classify(train, labels, torch.tensor([[1.0, 0.05], [0.1, 1.0]]), num_classes=3, k=2, temperature=0.1)
    assert scores.argmax(1).tolist() == [0, 1]
    assert scores[1, 2] == 0  # class 2 is not among the 2 nearest
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    assert topk_correct(logits, torch.tensor([2, 0]), (1, 2)) == [1, 2]
    assert topk_correct(logits, torch.tensor([2, 0]), (1, 5)) == [1, 2]  # k capped at the class count


def test_knn_command_and_random_baseline(tmp_path, mae_file):
    def cfg(out, checkpoint):
        return KNNConfig(
            model=ProbeEncoderConfig(checkpoint=checkpoint, kwargs={} if checkpoint else dict(ENCODER)),
            data=DataConfig(**DIGITS),
            knn=KNNSettings(k=5),
            run=RunSettings(output_dir=str(out), precision="fp32", progress=False),
        )

    pretrained = run_knn(cfg(tmp_path / "a", str(mae_file)))
    assert pretrained["memory"] == 128 and pretrained["images"] == 128 and pretrained["model"] == "vit_tiny_patch4"
    assert pretrained["pool"] == "token"  # what --pool auto resolved to for a ViT, not "auto"
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["top1"] == pretrained["top1"]
    assert (tmp_path / "a" / "config.yaml").exists()
    random_init = run_knn(cfg(tmp_path / "b", None))
    assert random_init["checkpoint"] is None and 0 <= random_init["top1"] <= random_init["top5"] <= 100


def test_knn_monitor_during_pretraining(tmp_path):
    from openmae.config import OptimConfig, TrainConfig
    from openmae.data import build_dataset
    from openmae.engine import Trainer
    from openmae.runtime import Runtime
    from openmae.tasks import PretrainTask
    from openmae.transforms import eval_transform

    data = DataConfig(**DIGITS)
    train = build_dataset(data, "train", augment=True)
    bank, queries = build_dataset(data, "train", augment=False), build_dataset(data, "test", augment=False)
    bank.transform = queries.transform = eval_transform(16, bank.mean, bank.std)
    task = PretrainTask(openmae.create_model("mae_vit_tiny_patch4", **MAE))
    train_cfg = TrainConfig(output_dir=str(tmp_path), **FAST)
    runtime = Runtime.create(train_cfg.device, train_cfg.precision)
    hooks = [KNNMonitor(bank, queries, every=1, k=5)]
    Trainer(task, train, runtime, train=train_cfg, optim=OptimConfig(), data=data, config={}, hooks=hooks).fit()
    end = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "epoch_end" in line]
    assert 0 <= end[-1]["knn/top1"] <= end[-1]["knn/top5"] <= 100


# -- features -----------------------------------------------------------------------------------


def test_embed_is_deterministic_and_lists_paths(tmp_path, mae_file):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    exact = dict(checkpoint=str(mae_file), precision="fp32")  # auto may pick bf16: not the encoder's exact features
    a = embed_folder(folder, tmp_path / "a.safetensors", **exact, batch_size=2)
    for again in ("b", "c"):  # the same bytes every time (safetensors metadata order included)
        embed_folder(folder, tmp_path / f"{again}.safetensors", **exact, batch_size=2)
        assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / f"{again}.safetensors").read_bytes()
    assert a["count"] == 5 and a["dim"] == 32 and a["failed"] == [str(folder / "broken.jpg")]
    tensors, meta = read_safetensors(tmp_path / "a.safetensors")
    info = json.loads(meta["openmae"])
    paths = info["paths"]
    assert tensors["features"].shape == (5, 32) and paths[0] == str(folder / "0.png") and len(paths) == 5
    assert info["pool"] == "token" and info["failed"] == a["failed"]
    # batching does not change the features; .npy goes with a paths file
    embed_folder(folder, tmp_path / "d.npy", **exact, batch_size=5)
    assert np.allclose(np.load(tmp_path / "d.npy"), tensors["features"].numpy(), atol=1e-5)
    assert (tmp_path / "d.paths.txt").read_text().splitlines() == paths
    # the features are the encoder's: the MAE's cls token after its final norm
    mae = openmae.load_pretrained(mae_file).eval()
    from openmae.data import default_normalization, load_image
    from openmae.transforms import eval_transform

    x = eval_transform(16, *default_normalization(1))(load_image(paths[0], 1)).unsqueeze(0)
    assert torch.allclose(mae.encode(x)[0, 0], tensors["features"][0], atol=1e-5)


# -- other checkpoint formats -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["official", "timm", "hf"])
def test_foreign_checkpoints_load_into_the_classifier(tmp_path, mae_file, fmt):
    from openmae.interop.classifier import ClassifierLayout, build_classifier, read_encoder

    mae = openmae.load_pretrained(mae_file)
    name = {"official": "w.pth", "timm": "w.safetensors", "hf": "hf_dir"}[fmt]
    path = openmae.export_pretrained(mae, tmp_path / name, format=fmt)
    path = tmp_path / name
    cfg = ProbeEncoderConfig(checkpoint=str(path), kwargs={"num_heads": 2})
    model = build_classifier(cfg, read_encoder(str(path)), ClassifierLayout(num_classes=3), img_size=16, in_chans=1)
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(model.eval().forward_head(model.forward_features(x), pre_logits=True), mae.encode(x)[:, 0], atol=1e-6)


# -- bad input ----------------------------------------------------------------------------------


def test_clear_errors(tmp_path, mae_file):
    from safetensors.torch import save_file

    layer_scale = dict(weights(mae_file), **{"blocks.0.ls1.gamma": torch.ones(32)})  # a ViT of another kind
    save_file(layer_scale, str(tmp_path / "ls.safetensors"))
    with pytest.raises(ConfigError, match="architecture differs"):
        run_knn(KNNConfig(model=ProbeEncoderConfig(checkpoint=str(tmp_path / "ls.safetensors"), kwargs={"num_heads": 2}),
                          data=DataConfig(**DIGITS)))
    with pytest.raises(ConfigError, match="another architecture"):
        run_linprobe(linprobe_cfg(tmp_path / "x", mae_file, name="vit_base_patch16"))
    with pytest.raises(ConfigError, match="2 classes but the data has 10"):  # eval-only: a head for other classes
        model = openmae.create_model("vit_tiny_patch4", **ENCODER, num_classes=2)
        run_finetune(_eval_only(finetune_cfg(tmp_path / "y", openmae.save_pretrained(model, tmp_path / "c2.safetensors"))))
    with pytest.raises(ConfigError, match="no classifier head"):
        run_finetune(_eval_only(finetune_cfg(tmp_path / "z", mae_file)))
    with pytest.raises(ConfigError, match="channel"):
        cfg = finetune_cfg(tmp_path / "w", mae_file)
        cfg.data = FinetuneData(**dict(DIGITS, channels=3))
        run_finetune(cfg)
    with pytest.raises(ConfigError, match="tune_blocks"):
        FinetuneSettings(tune_blocks="half")
    # a recipe's value outside a protocol's declared choices (the CLI's argparse never sees it)
    with pytest.raises(ConfigError, match="data.augment must be one of rrc, none, got 'crop'"):
        from_dict(FinetuneConfig, {"data": {"name": "digits", "augment": "crop"}})
    with pytest.raises(ConfigError, match="linprobe.optimizer must be one of lars, sgd, adamw"):
        from_dict(LinprobeConfig, {"linprobe": {"optimizer": "lamb"}})

    folder = tmp_path / "unlabelled"
    for split in ("train", "val"):
        (folder / split).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(folder / split / f"{i}.png")
    rc = main(["linprobe", "--data", str(folder), "--img-size", "16", "--output", str(tmp_path / "u")])
    assert rc == 2


def _labelled_folder(root: Path, classes: int, per_class: int) -> Path:
    rng = np.random.default_rng(classes)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / split / f"class{c}" / f"{i}.png")
    return root


def test_resume_refuses_another_class_count(tmp_path, mae_file):
    run_linprobe(linprobe_cfg(tmp_path / "run", mae_file))  # 10 digit classes, checkpoints in run/
    cfg = linprobe_cfg(tmp_path / "run", mae_file)
    cfg.data = LinprobeData(path=str(_labelled_folder(tmp_path / "three", 3, 12)), img_size=16, channels=1, num_workers=0)
    # the settings differ (other data), so auto-resume refuses before any shape is compared
    with pytest.raises(ConfigError, match=r"saved with other settings: .*data\.name \"digits\" -> \"folder\""):
        run_linprobe(cfg)


# -- recipes ------------------------------------------------------------------------------------


def test_protocol_recipes_parse():
    from openmae.config import CONFIG_DIR

    found = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert {"finetune_vit_base_in1k", "linprobe_vit_base_in1k", "finetune_cpu_small", "linprobe_cpu_small"} <= found
    for name in sorted(found):
        kind = name.split("_")[0]
        if kind not in ("finetune", "linprobe"):
            continue
        data = load_recipe(name)
        if data.get("data", {}).get("name") == "folder":
            data["data"]["path"] = str(Path(__file__).parent)
        cfg = from_dict(FinetuneConfig if kind == "finetune" else LinprobeConfig, data)
        if name == "finetune_vit_base_in1k":
            assert (cfg.finetune.layer_decay, cfg.model.drop_path_rate, cfg.optim.base_lr) == (0.65, 0.1, 5e-4)
            assert cfg.finetune.mixup == 0.8 and cfg.finetune.cutmix == 1.0 and cfg.optim.betas == [0.9, 0.999]
            assert cfg.data.augment == "rrc" and cfg.finetune.auto_augment == "rand-m9-mstd0.5-inc1"
        if name == "linprobe_vit_base_in1k":
            assert cfg.linprobe.optimizer == "lars" and cfg.optim.base_lr == 0.1 and cfg.model.global_pool == "token"
