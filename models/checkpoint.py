"""The checkpoint format: one plain dict, saved with `torch.save`, read with `weights_only=True`.

Keys (format_version 1):
    format_version  int, this module's FORMAT_VERSION
    architecture    str, a key of `models.network.ARCHITECTURES`
    state_dict      the unwrapped module's tensors
    classes         list[str], class names in logit order
    preprocessing   `PreprocessingSpec` as a dict (size, grayscale, mean, std, interpolation)
    metrics         dict measured by `training.evaluate` on the val split ({} until evaluated):
                    the figures of one precision and TTA mode (their names under "precision" and
                    "tta", "none" when absent), those of other modes under "tta_alternatives"
                    (mode → figures), and blocks of the same shape for other precisions under
                    "precision_alternatives" (precision → block)
    training        dict: recipe, the TrainConfig, the epoch chosen, the per-epoch history
    created_at      ISO-8601 UTC time of saving
    torch_version   the torch that wrote it

Reading needs no torch (`models/weights_file.py` reads torch's zip format with a pickle that may
build nothing but tensors, as `torch.load(weights_only=True)` would): the service serving through
ONNX Runtime reads the stored figures, the classes and the weights' hash from this same file.
Building the torch network (`Checkpoint.network`) and writing a checkpoint import torch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.errors import CheckpointError
from models.figures import StoredFigures
from models.preprocessing import PreprocessingSpec
from models.tta import check_tta
from models.weights_file import TORCH_DTYPE_NAMES, WeightsFileError, read_weights_file

if TYPE_CHECKING:
    from torch import nn

FORMAT_VERSION = 1
# The model the project ships, beside this module; the service and `fer` default to it.
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint.pth"
CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
REQUIRED_KEYS = ("format_version", "architecture", "state_dict", "classes", "preprocessing", "metrics", "training")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its weights as numpy arrays and everything needed to use them."""

    path: Path
    state_dict: dict[str, np.ndarray]
    architecture: str
    classes: tuple[str, ...]
    preprocessing: PreprocessingSpec
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    sha256: str = ""

    @property
    def version(self) -> str:
        """A short, stable model version: the architecture and the first 12 hex digits of the file hash."""
        return f"{self.architecture}-{self.sha256[:12]}"

    @functools.cached_property
    def figures(self) -> StoredFigures:
        """The stored evaluation figures, by precision and TTA mode (`models/figures.py`)."""
        return StoredFigures(self.metrics)

    @functools.cached_property
    def weights_sha256(self) -> str:
        """The hash of the weights alone (`weights_sha256`), which the ONNX files record."""
        return weights_sha256(self.state_dict)

    @functools.cached_property
    def network(self) -> nn.Module:
        """The torch network in eval mode, built on first use (imports torch).

        Raises:
            CheckpointError: the architecture is unknown or the weights do not fit it.
        """
        import torch

        from models.network import ARCHITECTURES, build_network

        if self.architecture not in ARCHITECTURES:
            known = ", ".join(sorted(ARCHITECTURES))
            raise CheckpointError(
                f"checkpoint {self.path}: unknown architecture {self.architecture!r} (this code knows {known})"
            )
        network = build_network(self.architecture, num_classes=len(self.classes))
        try:
            network.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.state_dict.items()}, strict=True)
        except (RuntimeError, TypeError, AttributeError) as exc:
            first = str(exc).replace("\n", " ").replace("\t", "")
            raise CheckpointError(
                f"checkpoint {self.path}: weights do not fit {self.architecture} with {len(self.classes)} classes "
                f"({first[:300]})"
            ) from None
        return network.eval()


def weights_sha256(state_dict: Mapping[str, Any]) -> str:
    """A hash of the weights alone (names, dtypes, shapes, values), stable across metric updates.

    Takes numpy arrays or torch tensors: the dtype is spelled as torch prints it and the values
    are their little-endian bytes, so a network's `state_dict()` and the same weights read
    without torch hash alike.
    """
    digest = hashlib.sha256()
    for name, value in sorted(state_dict.items()):
        array = np.array(value.detach().cpu().numpy() if hasattr(value, "detach") else value, order="C")  # keeps 0-d
        digest.update(f"{name}:{TORCH_DTYPE_NAMES[array.dtype]}:{tuple(array.shape)};".encode())
        digest.update(array.reshape(-1).view(np.uint8).tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: Path,
    network: nn.Module,
    *,
    classes: tuple[str, ...] | list[str] = CLASSES,
    preprocessing: PreprocessingSpec | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically (temp file, then `os.replace`), so a crash never leaves half a file."""
    import torch

    from models.network import ARCHITECTURES

    module = getattr(network, "_orig_mod", network)  # unwrap torch.compile
    architecture = type(module).__name__
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"cannot save {architecture}: it is not a known architecture")
    payload = {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "state_dict": {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()},
        "classes": list(classes),
        "preprocessing": (preprocessing or PreprocessingSpec()).to_dict(),
        "metrics": metrics or {},
        "training": training or {},
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
    }
    atomic_torch_save(payload, path)


def atomic_torch_save(payload: Any, path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, then rename it into place."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would, so that a
        # service running as another user (the container's) can read the checkpoint.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def read_checkpoint_dict(path: Path) -> dict[str, Any]:
    """Read and validate a checkpoint's raw dict (no network built).

    Raises:
        CheckpointError: missing, unreadable, not a checkpoint, or an unsupported version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        payload = read_weights_file(path)
    except WeightsFileError as exc:
        raise CheckpointError(f"checkpoint {path}: not a readable weights-only torch file ({str(exc)[:200]})") from None
    if not isinstance(payload, dict):
        kind = "tensor" if isinstance(payload, np.ndarray) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path}: holds a {kind}, not a checkpoint dict")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path}: not a fer-service checkpoint (missing keys: {', '.join(missing)})")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format_version {payload['format_version']!r}, this code reads {FORMAT_VERSION}"
        )
    return payload


def store_metrics(
    path: Path,
    metrics: dict[str, Any],
    alternatives: dict[str, dict[str, Any]] | None = None,
    precisions: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] | None = None,
) -> None:
    """Store evaluation figures in a checkpoint file, leaving everything else as it was.

    `metrics` were measured with the precision and TTA mode named in `metrics["precision"]` and
    `metrics["tta"]`, which become the main ones; `alternatives` maps other TTA modes to their
    figures, which `?tta=` serves; `precisions` maps other precisions to their own (metrics,
    alternatives), which a server that runs in that precision reports. Figures already stored
    for other precisions and modes stay when they were measured the same way (split, number of
    images, preprocessing; the weights are the same), so adding a mode or a precision keeps the
    rest; those measured again are replaced. `drop_figures` forgets a precision's.
    """
    main_precision = str(metrics.get("precision", "fp32"))
    blocks = [(main_precision, metrics, alternatives or {})]
    blocks += [
        (name, figures, others) for name, (figures, others) in (precisions or {}).items() if name != main_precision
    ]
    measured: dict[str, dict[str, dict[str, Any]]] = {}
    for precision, figures, others in blocks:
        mode = check_tta(str(figures.get("tta", "none")))
        by_mode = measured.setdefault(precision, {})
        by_mode[mode] = {**_bare(figures), "tta": mode, "precision": precision}
        for other, other_figures in others.items():
            if check_tta(other) != mode:  # the main figures of that mode win over a duplicate
                by_mode[other] = {**_bare(figures), **_bare(other_figures), "tta": other, "precision": precision}
    payload = read_checkpoint_dict(path)
    # Figures stored before stay only when they were measured the same way (split, images,
    # preprocessing): a test-split run must not sit beside val figures as if comparable.
    same_way = {key: metrics[key] for key in ("split", "num_images", "preprocessing") if key in metrics}
    # Figures against the FER+ truth stay only beside FER+ figures: a kept mode without its own
    # FER+ block would otherwise show the new main mode's as its own, so it goes; a new main
    # measured without the votes keeps the other modes but not their FER+ figures.
    has_ferplus = "ferplus" in metrics

    def kept_figures(by_mode: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        kept = {m: f for m, f in by_mode.items() if all(f.get(k, v) == v for k, v in same_way.items())}
        if has_ferplus:
            return {m: f for m, f in kept.items() if "ferplus" in f}
        return {m: {k: v for k, v in f.items() if k != "ferplus"} for m, f in kept.items()}

    table = {
        precision: kept
        for precision, by_mode in _figure_table(payload["metrics"]).items()
        if (kept := kept_figures(by_mode))
    }
    for precision, by_mode in measured.items():
        table.setdefault(precision, {}).update(by_mode)
    main_mode = check_tta(str(metrics.get("tta", "none")))
    stored = _figure_block(table[main_precision], main_mode)
    others = {
        precision: _figure_block(by_mode, main_mode)
        for precision, by_mode in table.items()
        if precision != main_precision
    }
    if others:
        stored["precision_alternatives"] = others
    payload["metrics"] = stored
    write_checkpoint_dict(payload, path)


def drop_figures(path: Path, precision: str) -> bool:
    """Forget the stored figures of `precision` (say, int8 after re-quantising); True when there were some."""
    payload = read_checkpoint_dict(path)
    stored = dict(payload["metrics"])
    others = dict(stored.pop("precision_alternatives", {}))
    if precision in others:
        del others[precision]
    elif "accuracy" in stored and str(stored.get("precision", "fp32")) == precision:
        # Another precision's figures, if any, become the main ones.
        stored = others.pop(next(iter(others))) if others else {}
    else:
        return False
    if others:
        stored["precision_alternatives"] = others
    payload["metrics"] = stored
    write_checkpoint_dict(payload, path)
    return True


def write_checkpoint_dict(payload: dict[str, Any], path: Path) -> None:
    """Save a dict read by `read_checkpoint_dict` (its weights numpy arrays) as a checkpoint again (imports torch)."""
    import torch

    weights = {
        name: value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
        for name, value in payload["state_dict"].items()
    }
    atomic_torch_save({**payload, "state_dict": weights}, path)


def _bare(figures: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in figures.items() if key not in ("tta_alternatives", "precision_alternatives")}


def _figure_table(stored: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Stored metrics as precision → TTA mode → figures ({} before any evaluation)."""
    if "accuracy" not in stored:
        return {}
    blocks = {str(stored.get("precision", "fp32")): stored, **stored.get("precision_alternatives", {})}
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for precision, block in blocks.items():
        main = str(block.get("tta", "none"))
        base = _bare(block)
        by_mode = {main: {**base, "tta": main}}
        by_mode.update(
            {mode: {**base, **figures, "tta": mode} for mode, figures in block.get("tta_alternatives", {}).items()}
        )
        table[precision] = by_mode
    return table


def _figure_block(by_mode: dict[str, dict[str, Any]], preferred: str) -> dict[str, Any]:
    """One precision's figures: those of `preferred` (else its first mode), the others under "tta_alternatives"."""
    main = preferred if preferred in by_mode else next(iter(by_mode))
    block = dict(by_mode[main])
    others = {mode: figures for mode, figures in by_mode.items() if mode != main}
    if others:
        block["tta_alternatives"] = others
    return block


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint as `torch.load(weights_only=True)` would, without torch (`models/weights_file.py`).

    The torch network is built when first asked for (`Checkpoint.network`), so a service that
    serves through ONNX Runtime never imports torch.

    Raises:
        CheckpointError: one line naming the file and what is wrong with it.
    """
    path = Path(path)
    payload = read_checkpoint_dict(path)
    architecture = payload["architecture"]
    state_dict = payload["state_dict"]
    if not isinstance(architecture, str) or not isinstance(state_dict, dict):
        raise CheckpointError(f"checkpoint {path}: its architecture or state_dict entry is not what a checkpoint holds")
    if not all(isinstance(name, str) and isinstance(value, np.ndarray) for name, value in state_dict.items()):
        raise CheckpointError(f"checkpoint {path}: its state_dict holds something other than named tensors")
    classes = tuple(payload["classes"])
    if not classes or not all(isinstance(name, str) for name in classes) or len(set(classes)) != len(classes):
        raise CheckpointError(f"checkpoint {path}: classes must be distinct names, got {list(classes)!r}")
    try:
        preprocessing = PreprocessingSpec.from_dict(dict(payload["preprocessing"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: bad preprocessing entry ({exc})") from None
    try:
        check_tta(str(payload["metrics"].get("tta", "none")))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: its metrics name an unknown TTA mode ({exc})") from None
    return Checkpoint(
        path=path,
        state_dict=state_dict,
        architecture=architecture,
        classes=classes,
        preprocessing=preprocessing,
        metrics=dict(payload["metrics"]),
        training=dict(payload["training"]),
        created_at=str(payload.get("created_at", "")),
        sha256=file_sha256(path),
    )


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
