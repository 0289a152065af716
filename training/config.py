"""Training recipes as one frozen dataclass, filled by the CLI and saved in the checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from training.teacher import check_teacher_weight


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. The recipe picks the defaults; flags override them."""

    recipe: str = "default"
    # The network, by its name in `models.network.ARCHITECTURES`; the checkpoint records it too.
    architecture: str = "EmotionRecognitionModelPyTorch"
    epochs: int = 45  # 45 epochs × 224 steps on a 2-core CPU, about 2 h (the `default` model ran 200)
    batch_size: int = 128
    optimizer: str = "adamw"  # "adamw", "adam" or "sgd" (Nesterov momentum 0.9)
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.05  # decoupled for AdamW; L2 for SGD
    warmup_epochs: int = 2  # linear warm-up before the cosine decay
    schedule: str = "cosine"  # "cosine" (per step, to zero) or "plateau" (seed: halve on val-loss plateau)
    plateau_patience: int = 50
    plateau_factor: float = 0.5
    early_stop_patience: int = 0  # epochs without val-loss improvement; 0 = never stop early
    label_smoothing: float = 0.1
    # Targets (training/ferplus.py): "original" folder labels, the FER+ "majority" or the FER+
    # "votes" distribution; original_weight mixes the folder's one-hot into a FER+ target.
    label_mode: str = "original"
    original_weight: float = 0.0
    # Knowledge distillation (training/teacher.py): the target becomes (1 - w) * the label mode's
    # target + w * a teacher's probabilities from this file ("" = no teacher).
    teacher: str = ""
    teacher_weight: float = 0.0
    # Logit-adjusted loss (Menon et al. 2021, "Long-tail learning via logit adjustment"): the
    # loss sees logits + tau * log(prior of the training targets), so the raw logits the service
    # serves assume a prior of prior^(1 - tau): 1 = every class equally likely, 0 = the training prior.
    logit_adjustment: float = 0.0
    # Start from this checkpoint's weights instead of a random initialisation ("" = from scratch).
    init_from: str = ""
    # WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the checkpoint gets
    # (1 - a) * init_from's weights + a * the fine-tuned ones. Interpolating keeps what the starting
    # model knew about photos unlike the training data; 1 = the fine-tuned weights as they are.
    interpolation: float = 1.0
    # Augmentation, applied to whole batches as tensors (training/augment.py).
    hflip: bool = True
    rotate_degrees: float = 10.0
    translate_fraction: float = 0.1
    scale_range: float = 0.1  # zoom by a factor in [1 - s, 1 + s]; the seed used none
    erase_probability: float = 0.5  # random erasing of one rectangle (2-20% of the face)
    noise_std: float = 0.0  # Gaussian noise on the normalised [-1, 1] input
    # What photos add to FER2013's web crops (chosen on kdef-dev, docs/training.md): a keystone
    # warp as a head turned by up to this fraction, gamma in [exp(-g), exp(g)], contrast in
    # [1 - c, 1 + c], and a light Gaussian blur with this probability.
    perspective: float = 0.0
    gamma_range: float = 0.0
    contrast_range: float = 0.0
    blur_probability: float = 0.0
    selection: str = "final"  # "final" weights, "val_loss" (lowest) or "val_accuracy" (highest)
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 where the CPU/GPU supports it), "bf16" or "fp32"
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = all cores
    # training/speed.py: the same function trained about 2x faster on a CPU; off only to measure that.
    cpu_speedups: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the checkpoint and the history file."""
        return asdict(self)


# What `--recipe ferplus` and `distil` fine-tune: the `default` recipe's 200-epoch model, shipped until issue 33 (its
# weights are those of models/checkpoint.pth at 3fd1dd3, which BASE_COMMAND restores).
BASE_CHECKPOINT = "runs/default-recipe.pth"
BASE_COMMAND = f"mkdir -p runs && git show 3fd1dd3:models/checkpoint.pth > {BASE_CHECKPOINT}"

# What `--recipe distil` learns from: facex's probabilities for FER2013 train and for one turned
# view of each face (training/teacher_facex.py; derived from the dataset, so never committed).
TEACHER_FILE = "runs/teacher-facex-turned.npz"
TEACHER_COMMAND = f"python -m training.teacher_facex --turned-views --out {TEACHER_FILE}"

# The best of the FER+ fine-tunes measured (issue 33, docs/training.md: run R1 blended halfway
# back, val 0.663, FER+ val 0.717, kdef-dev 0.768 / 0.627, measured with the first keystone warp): the default recipe's network on FER+
# vote distributions blended with the folder labels, logit-adjusted, with the photo
# augmentations. Within a point of the `default` model everywhere, so it never replaced it.
FERPLUS = TrainConfig(
    recipe="ferplus",
    epochs=8,
    lr=2e-4,
    warmup_epochs=1,
    label_smoothing=0.05,
    label_mode="votes",
    original_weight=0.5,
    logit_adjustment=1.0,
    init_from=BASE_CHECKPOINT,
    interpolation=0.5,
    perspective=0.2,
    gamma_range=0.3,
    contrast_range=0.3,
    blur_probability=0.3,
)

RECIPES: dict[str, TrainConfig] = {
    # The seed notebook: Adam 1e-4, plateau schedule on val loss, early stop after 205 epochs,
    # flip + affine(±10°, 10%) + Gaussian noise (std 0.05 on the [-1, 1] input: visible grain,
    # never saturating), plain cross-entropy, best val loss becomes the checkpoint.
    "seed": TrainConfig(
        recipe="seed",
        epochs=1000,
        batch_size=64,
        optimizer="adam",
        lr=1e-4,
        weight_decay=0.0,
        warmup_epochs=0,
        schedule="plateau",
        plateau_patience=50,
        plateau_factor=0.5,
        early_stop_patience=205,
        label_smoothing=0.0,
        scale_range=0.0,
        erase_probability=0.0,
        noise_std=0.05,
        selection="val_loss",
    ),
    # The model shipped until issue 33: AdamW with warm-up and per-step cosine decay, label smoothing 0.1,
    # affine with zoom, random erasing. Selection takes the final weights: with label smoothing
    # the lowest val loss picks a poor epoch, and choosing on val accuracy would bias the
    # reported val figure upwards.
    "default": TrainConfig(),
    "ferplus": FERPLUS,
    # The shipped model (issue 33, docs/training.md: run D13): the `ferplus` recipe's labels (FER+
    # votes blended half and half with the folder labels), each target mixed half and half with a
    # photo-trained teacher's probabilities (facex), whose turned views join the training images;
    # 60 epochs over the doubled set (shipped before it: D6 with 5, D9 with 15, D11 with 45),
    # τ = 0.5, the head-turn keystone up to 0.4, no WiSE blend.
    "distil": replace(
        FERPLUS,
        recipe="distil",
        epochs=60,
        teacher=TEACHER_FILE,
        teacher_weight=0.5,
        logit_adjustment=0.5,
        interpolation=1.0,
        perspective=0.4,
    ),
}


def check_config(config: TrainConfig) -> None:
    """Refuse settings that would silently do nothing or train on NaNs.

    Raises:
        ValueError: one line naming the setting and what it needs.
    """
    if config.logit_adjustment < 0:
        raise ValueError(f"--logit-adjustment must be at least 0, not {config.logit_adjustment}")
    if not 0.0 <= config.interpolation <= 1.0:
        raise ValueError(f"--interpolation must be within [0, 1], not {config.interpolation}")
    if config.interpolation != 1.0 and not config.init_from:
        raise ValueError("--interpolation blends back towards --init-from's weights: give --init-from too")
    if config.original_weight and config.label_mode == "original":
        raise ValueError(
            "--original-weight mixes the folder labels into a FER+ target: use --label-mode votes or majority "
            "(or --original-weight 0 with --label-mode original)"
        )
    if not 0.0 <= config.original_weight <= 1.0:
        raise ValueError(f"--original-weight must be within [0, 1], not {config.original_weight}")
    check_teacher_weight(config.teacher_weight)
    if bool(config.teacher) != bool(config.teacher_weight):
        raise ValueError("--teacher FILE and --teacher-weight w (above 0) go together")
    if not 0.0 <= config.perspective < 1.0 or not 0.0 <= config.contrast_range <= 1.0 or config.gamma_range < 0:
        raise ValueError("--perspective must be within [0, 1), --contrast-range within [0, 1], --gamma-range >= 0")
    if not 0.0 <= config.blur_probability <= 1.0:
        raise ValueError(f"--blur-probability must be within [0, 1], not {config.blur_probability}")


def config_for(recipe: str, **overrides: Any) -> TrainConfig:
    """The recipe's config with the given fields replaced (None values are ignored)."""
    base = RECIPES[recipe]
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
