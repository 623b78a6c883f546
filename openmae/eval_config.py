"""Typed settings of the evaluation protocols: fine-tuning, linear probing, kNN.

Each protocol is a dataclass of sections, read like pretraining's (``--section.field`` flags,
YAML recipes with overrides only, defaults < recipe < flags). ``data``, ``optim`` and ``train``
reuse pretraining's sections with the protocol's defaults; the defaults are the built-in CPU runs
on Fashion-MNIST, and the paper's ImageNet recipes ship as ``finetune_*`` / ``linprobe_*`` YAMLs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from openmae.config import (
    GLOBAL_POOLS,
    ConfigError,
    DataConfig,
    OptimConfig,
    TrainConfig,
    check_choices,
    check_types,
    device_opt,
    opt,
    precision_opt,
)


def parse_tune_blocks(value: str | int) -> str | int:
    """``all``, ``mlp`` or a block count K >= 0 (int)."""
    text = str(value).strip().lower()
    if text in ("all", "mlp"):
        return text
    try:
        k = int(text)
    except ValueError:
        k = -1
    if k < 0:
        raise ConfigError(f"finetune.tune_blocks must be all, mlp or a number of blocks >= 0, got {value!r}")
    return k


# -- shared sections -------------------------------------------------------------------------


@dataclass
class EncoderConfig:
    checkpoint: str | None = opt(
        None,
        "the pretrained encoder: an openmae run folder or file, an official MAE .pth, a Hugging Face or "
        "timm checkpoint (anything openmae.load_pretrained reads); unset = random initialisation",
        alias="--checkpoint",
    )
    name: str | None = opt(
        None,
        "classifier architecture (`openmae models vit_`; an MAE name picks its encoder); "
        "default: the checkpoint's, else vit_micro_patch4",
        alias="--model",
    )
    global_pool: str = opt(
        "avg", "avg: mean of the patch tokens + fc_norm; token: the cls token after the final norm",
        choices=GLOBAL_POOLS, alias="--pool",
    )
    drop_path_rate: float = opt(0.1, "stochastic depth rate of the last block (paper: 0.1 B, 0.2 L, 0.3 H)", alias="--drop-path")
    kwargs: dict = opt({}, "constructor overrides a file does not record, repeatable: num_heads=4 or {num_heads: 4}")
    allow_partial: bool = opt(
        False, "load a checkpoint that lacks encoder tensors: they keep their initial values and the load report "
        "names them (default: refuse it, naming them)", alias="--allow-partial",
    )

    def __post_init__(self) -> None:
        check_types(self, "model")
        check_choices(self, "model")  # global_pool: avg or token here, auto too for the probes
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.name is not None:
            from openmae.models.classifier import classifier_name

            if classifier_name(self.name) is None:
                from openmae.models import list_models

                names = ", ".join(n for n in list_models("vit_") if n.startswith("vit_"))
                raise ConfigError(f"model.name {self.name!r} has no ViT classifier; choose one of {names}")


@dataclass
class ProbeEncoderConfig(EncoderConfig):
    global_pool: str = opt(
        "auto",
        "token: the cls token after the final norm (the paper's linear probe); avg: mean of the patch tokens; "
        "auto: token where the encoder has a cls token, else avg (ConvMAE)",
        choices=(*GLOBAL_POOLS, "auto"), alias="--pool",
    )
    drop_path_rate: float = opt(0.0, "stochastic depth (the encoder is frozen: leave at 0)", alias="--drop-path")


@dataclass
class HeldOutEval:
    """Held-out evaluation beside training, and ``--eval-only`` for a saved model: the protocols' and the
    dense commands' ``eval`` section, each adding its own fields."""

    only: bool = opt(False, "evaluate model.checkpoint (a classifier trained with this protocol) and exit", alias="--eval-only")
    every: int = opt(1, "evaluate on the held-out split every N epochs (0: only at the end)")
    batch_size: int = opt(256, "images per evaluation batch")

    def __post_init__(self) -> None:
        check_types(self, "eval")
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {self.every}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class EvalSettings(HeldOutEval):
    crop_pct: float = opt(1.0, "evaluation: resize to img_size / crop_pct, then center-crop (ImageNet recipes: 0.875)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"eval.crop_pct must be in (0, 1], got {self.crop_pct}")


@dataclass
class ProtocolData(DataConfig):
    """Labelled data of fine-tuning and linear probing; each protocol declares its augmentations."""

    crop_scale: list[float] = opt([0.08, 1.0], "RandomResizedCrop area range (paper: [0.08, 1.0])")


# -- fine-tuning ----------------------------------------------------------------------------


@dataclass
class FinetuneData(ProtocolData):
    augment: str = opt(
        "none", "rrc: the fine-tuning recipe, built by timm (RandomResizedCrop(crop_scale) + flip + RandAugment + "
        "random erasing; the paper's); none: no augmentation (the short CPU default)", choices=("rrc", "none"),
    )


@dataclass
class FinetuneOptim(OptimConfig):
    base_lr: float = opt(4e-3, "lr = base_lr * effective batch / 256 (paper: 5e-4 B, 1e-3 L/H)", alias="--blr")
    min_lr: float = opt(1e-6, "floor of the cosine schedule")
    betas: list[float] = opt([0.9, 0.999], "AdamW betas")
    warmup_epochs: float = opt(0.5, "linear warmup length in epochs (paper: 5)", alias="--warmup-epochs")


@dataclass
class FinetuneTrain(TrainConfig):
    epochs: int = opt(2, "number of epochs (paper: 100 B, 50 L/H)", alias="--epochs")
    output_dir: str = opt("runs/finetune", "where logs, checkpoints, metrics.json and the model go", alias="--output")


@dataclass
class FinetuneSettings:
    layer_decay: float = opt(
        0.75, "layer-wise lr decay: block i of D gets lr x decay^(D - i), the patch embedding decay^(D + 1); "
        "1 = off (paper: 0.65 B, 0.75 L/H)", alias="--layer-decay",
    )
    tune_blocks: str = opt(
        "all", "train all, only the last K blocks (0: the head alone), or mlp (the MLP half of the last block); "
        "the head, fc_norm and (K > 0) the final norm always train", alias="--tune-blocks",
    )
    smoothing: float = opt(0.1, "label smoothing")
    mixup: float = opt(0.0, "mixup alpha, 0 = off (paper: 0.8)")
    cutmix: float = opt(0.0, "cutmix alpha, 0 = off (paper: 1.0)")
    mixup_prob: float = opt(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = opt(0.5, "probability of cutmix rather than mixup when both are on")
    auto_augment: str | None = opt(
        "rand-m9-mstd0.5-inc1", "timm RandAugment policy (the paper's: rand-m9-mstd0.5-inc1), or none",
        alias="--rand-augment",
    )
    reprob: float = opt(0.25, "random erasing probability (paper: 0.25)")

    def __post_init__(self) -> None:
        check_types(self, "finetune")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"finetune.layer_decay must be in (0, 1], got {self.layer_decay}")
        self.tune_blocks = str(parse_tune_blocks(self.tune_blocks))
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"finetune.smoothing must be in [0, 1), got {self.smoothing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError("finetune.mixup and finetune.cutmix are alphas >= 0 (0 = off)")
        for name in ("mixup_prob", "mixup_switch_prob", "reprob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"finetune.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.auto_augment in ("", "none", "None"):
            self.auto_augment = None
        if self.auto_augment is not None and not self.auto_augment.startswith("rand-"):
            raise ConfigError(
                f"finetune.auto_augment must be a timm RandAugment policy like rand-m9-mstd0.5-inc1, got {self.auto_augment!r}"
            )

    def mixing(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


@dataclass
class FinetuneConfig:
    model: EncoderConfig = field(default_factory=EncoderConfig)
    data: FinetuneData = field(default_factory=FinetuneData)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    train: FinetuneTrain = field(default_factory=FinetuneTrain)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)


# -- linear probing -------------------------------------------------------------------------


@dataclass
class LinprobeData(ProtocolData):
    augment: str = opt("none", "rrc: RandomResizedCrop+flip (paper); crop: fixed-size crop+flip; none", choices=("rrc", "crop", "none"))


@dataclass
class LinprobeOptim(OptimConfig):
    base_lr: float = opt(
        16.0, "lr = base_lr * effective batch / 256. LARS moves a weight matrix by about lr x 0.001 of its norm per "
        "step, so few steps need a large lr: the paper's 0.1 is for batch 16384 over ~7000 steps", alias="--blr",
    )
    weight_decay: float = opt(0.0, "weight decay of the linear layer (paper: 0)")
    warmup_epochs: float = opt(1.0, "linear warmup length in epochs (paper: 10 of 90)", alias="--warmup-epochs")


@dataclass
class LinprobeTrain(TrainConfig):
    epochs: int = opt(4, "number of epochs (paper: 90)", alias="--epochs")
    batch_size: int = opt(256, "images per process per step (paper: 16384 in all)", alias="--batch-size")
    output_dir: str = opt("runs/linprobe", "where logs, checkpoints, metrics.json and the model go", alias="--output")


@dataclass
class LinprobeSettings:
    optimizer: str = opt("lars", "lars (the paper's, momentum 0.9, trust 0.001), sgd, or adamw", choices=("lars", "sgd", "adamw"))
    momentum: float = opt(0.9, "momentum of LARS / SGD")

    def __post_init__(self) -> None:
        check_types(self, "linprobe")
        check_choices(self, "linprobe")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"linprobe.momentum must be in [0, 1), got {self.momentum}")


@dataclass
class LinprobeConfig:
    model: ProbeEncoderConfig = field(default_factory=ProbeEncoderConfig)
    data: LinprobeData = field(default_factory=LinprobeData)
    optim: LinprobeOptim = field(default_factory=LinprobeOptim)
    train: LinprobeTrain = field(default_factory=LinprobeTrain)
    linprobe: LinprobeSettings = field(default_factory=LinprobeSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        if self.model.drop_path_rate:
            raise ConfigError("linear probing keeps the encoder frozen: drop --model.drop_path_rate")


# -- kNN ---------------------------------------------------------------------------------------


@dataclass
class KNNSettings:
    k: int = opt(20, "neighbours that vote", alias="--k")
    temperature: float = opt(0.07, "votes weigh exp(cosine similarity / temperature)", alias="--temperature")
    batch_size: int = opt(256, "images per feature batch", alias="--batch-size")
    crop_pct: float = opt(1.0, "resize to img_size / crop_pct, then center-crop (ImageNet: 0.875)")

    def __post_init__(self) -> None:
        check_types(self, "knn")
        if self.k < 1:
            raise ConfigError(f"knn.k must be >= 1, got {self.k}")
        if self.temperature <= 0:
            raise ConfigError(f"knn.temperature must be > 0, got {self.temperature}")
        if self.batch_size < 1:
            raise ConfigError(f"knn.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"knn.crop_pct must be in (0, 1], got {self.crop_pct}")


@dataclass
class RunSettings:
    output_dir: str = opt("runs/knn", "where metrics.json and the run's config go", alias="--output")
    device: str = device_opt()
    precision: str = precision_opt()
    seed: int = opt(0, "seed (random initialisation of a model without checkpoint)", alias="--seed")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_types(self, "run")
        check_choices(self, "run")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"run.seed must be a whole number in [0, 2^63), got {self.seed}")
        if not self.output_dir.strip():
            raise ConfigError("run.output_dir is empty; pass --output FOLDER")


@dataclass
class KNNConfig:
    model: ProbeEncoderConfig = field(default_factory=ProbeEncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    knn: KNNSettings = field(default_factory=KNNSettings)
    run: RunSettings = field(default_factory=RunSettings)
