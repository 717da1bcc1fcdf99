"""Pre-training of the vanilla classifier, as in the paper: seeded, resumable, atomic.

The paper trains its VGG-11 with SGD (lr 0.01, momentum 0.9, weight decay 5e-4), batch
128, for 100 epochs, multiplying the learning rate by 0.57 every 10 epochs.
:func:`train_model` does exactly that by default (every value can be overridden),
evaluates on the validation split after each epoch, and, given a checkpoint path,
saves a resume state after every epoch so an interrupted run continues where it
stopped and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fairdeploy._io import atomic_torch_save
from fairdeploy._probe import check_model_takes_inputs
from fairdeploy._stale import remove_stale
from fairdeploy._text import seconds
from fairdeploy.checkpoint import check_plain_value, save_checkpoint
from fairdeploy.data._loader import batch_loader
from fairdeploy.errors import FairDeployError
from fairdeploy.progress import log, phase

__all__ = ["TrainResult", "resume_state_path", "train_model"]

_STATE_FORMAT = "fairdeploy-train-state/1"
# The hyperparameters a resume state must share with the run that continues it
# (``epochs`` may grow: training 2 epochs, then resuming to 4, is allowed).
_RESUME_KEYS = (
    "lr",
    "momentum",
    "weight_decay",
    "step_epochs",
    "gamma",
    "batch_size",
    "seed",
    "train_size",
    "data",
)


@dataclass(frozen=True, eq=False)
class TrainResult:
    """The outcome of :func:`train_model`.

    Attributes
    ----------
    model : nn.Module
        The trained copy after the last epoch, in eval mode, on the training device.
    history : list of dict
        One entry per epoch (all epochs, including those done before a resume):
        ``epoch`` (1-based), ``lr``, ``train_loss``, ``train_accuracy`` and, when a
        validation set was given, ``val_loss`` and ``val_accuracy``.
    resumed_from : int
        Epochs already done when this call started (0 for a fresh run).
    checkpoint_path : Path or None
        The final checkpoint, if one was written.
    unchanged : bool
        True when every epoch was already done and the checkpoint already held these
        weights: the file was left as it was (same SHA-256).
    """

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    checkpoint_path: Path | None = None
    unchanged: bool = False


def resume_state_path(checkpoint_path: str | Path) -> Path:
    """Where :func:`train_model` keeps its per-epoch resume state: ``<checkpoint>.train``."""
    p = Path(checkpoint_path)
    return p.with_name(p.name + ".train")


def _check_positive(name: str, value: Any, *, integer: bool, allow_zero: bool = False) -> None:
    ok_type = (
        isinstance(value, int) if integer else isinstance(value, int | float)
    ) and not isinstance(value, bool)
    if not ok_type or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "an integer" if integer else "a number"
        bound = "≥ 0" if allow_zero else ("≥ 1" if integer else "> 0")
        raise FairDeployError(f"{name}={value!r} is not allowed: use {kind} {bound}")


def _loader(dataset: Any, batch_size: int, *, shuffle: bool, generator: torch.Generator | None,
            num_workers: int, device: torch.device) -> Any:
    return batch_loader(dataset, batch_size, shuffle=shuffle, generator=generator,
                        num_workers=num_workers, pin_memory=device.type == "cuda")


def _batch(batch: Any, dtype: torch.dtype, device: torch.device,
           what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, list | tuple) or len(batch) != 3:
        raise FairDeployError(f"{what}: the dataset must yield (x, y, group) triples")
    x, y = batch[0], torch.as_tensor(batch[1]).long()
    if x.is_floating_point():
        x = x.to(dtype)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _check_labels(labels: Any, logits: torch.Tensor, what: str) -> None:
    """Labels must index the model's outputs (checked on the loader's CPU copy: no sync)."""
    if logits.ndim != 2:
        raise FairDeployError(
            f"{what}: the model returned shape {tuple(logits.shape)}; a classifier must "
            "return (batch, classes) logits"
        )
    k = int(logits.shape[1])
    y = torch.as_tensor(labels)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise FairDeployError(
            f"{what}: label {bad} is outside the model's {k} classes (0..{k - 1}); check "
            "model.num_classes against the data"
        )


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _evaluate(model: nn.Module, loader: Any,
              device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) over ``loader``."""
    model.eval()
    dtype = _param_dtype(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    n = 0
    with torch.inference_mode():
        for batch in loader:
            x, y = _batch(batch, dtype, device, "val_set")
            logits = model(x)
            _check_labels(batch[1], logits, "val_set")
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            n += y.numel()
    return float(loss_sum) / max(n, 1), float(correct) / max(n, 1)


def _cpu_state_dict(model: nn.Module) -> dict[str, Any]:
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _load_resume_state(path: Path, config: Mapping[str, Any], epochs: int) -> dict[str, Any]:
    fix = f"delete {str(path)!r} or train with resume=False (--no-resume) to start over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own text runs over several lines and advises weights_only=False: the
        # file is simply damaged or not ours, in one line.
        raise FairDeployError(
            f"cannot read the training resume state {str(path)!r}: it is damaged or was not "
            f"written by fairdeploy train ({type(exc).__name__}); {fix}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise FairDeployError(f"{str(path)!r} is not a fairdeploy training resume state; {fix}")
    saved = state["config"]
    for key in _RESUME_KEYS:
        if saved.get(key) != config[key]:
            if key == "data":
                raise FairDeployError(
                    f"the resume state {str(path)!r} was trained on other data (the training "
                    f"or validation split's content changed since); {fix}"
                )
            raise FairDeployError(
                f"the resume state {str(path)!r} was trained with {key}={saved.get(key)!r}, "
                f"this run asks for {key}={config[key]!r}; {fix}"
            )
    if state["epoch"] > epochs:
        raise FairDeployError(
            f"the resume state {str(path)!r} has {state['epoch']} epochs done, more than "
            f"epochs={epochs}; ask for at least {state['epoch']} epochs or {fix}"
        )
    return state


def train_model(
    model: nn.Module,
    train_set: Any,
    val_set: Any | None,
    *,
    epochs: int = 100,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    step_epochs: int = 10,
    gamma: float = 0.57,
    batch_size: int = 128,
    seed: int = 0,
    device: str | torch.device = "cpu",
    checkpoint_path: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    num_workers: int = 0,
    metadata: Mapping[str, Any] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
) -> TrainResult:
    """Train a classifier with the paper's recipe; return a trained copy.

    SGD with momentum and weight decay on the mean cross-entropy, the learning rate
    multiplied by ``gamma`` every ``step_epochs`` epochs (StepLR), shuffled batches
    drawn from a generator seeded with ``seed``. The caller's model is not modified,
    and the global RNG state is restored on return.

    Parameters
    ----------
    model : nn.Module
        The initialized model; it is copied.
    train_set, val_set : torch.utils.data.Dataset
        Map-style datasets yielding ``(x, y, group)``; ``group`` is not used in training.
        ``val_set`` may be None (no per-epoch evaluation).
    epochs, lr, momentum, weight_decay, step_epochs, gamma, batch_size
        The recipe; defaults are the paper's (100, 0.01, 0.9, 5e-4, 10, 0.57, 128).
    seed : int
        Seeds the shuffle and the global torch RNG (dropout). Same seed, data and
        initial model → the same weights (on the CPU; GPU kernels may add
        nondeterminism unless ``torch.use_deterministic_algorithms`` is on).
    device : str or torch.device
        Where to train.
    checkpoint_path : str or Path, optional
        Where to write the final checkpoint with
        :func:`fairdeploy.checkpoint.save_checkpoint`: ``{"state_dict": ...,
        "metadata": {"format", "version", "torch_version", **metadata, "history",
        "train_config"}}``, loadable with ``torch.load(weights_only=True)`` and
        :func:`fairdeploy.checkpoint.load_checkpoint`.
        After every epoch a resume state (model, optimizer, scheduler, RNG states,
        history) is written to :func:`resume_state_path` (``<checkpoint>.train``); it
        is kept after training so a later call can extend the run to more epochs.
    resume : bool
        Continue from an existing resume state (it must have been written with the same
        hyperparameters and training-set size; ``epochs`` may be larger). False starts
        over and overwrites it.
    progress : bool
        Report progress (:mod:`fairdeploy.progress`): a bar with loss and accuracy on a
        terminal; otherwise one log line per epoch (loss, accuracy, validation loss and
        accuracy, learning rate, elapsed time).
    num_workers : int
        DataLoader worker processes.
    metadata : mapping, optional
        Extra entries for the final checkpoint's ``metadata``, e.g. ``{"arch":
        "vgg11_paper", "num_classes": 2}``: str, int, float, bool, None, or lists/dicts
        of them.
    after_step : callable, optional
        Called with the model being trained after every optimizer step, under
        ``torch.no_grad()``; it may change parameters in place (FairQuantize uses it
        to hold quantized weights at their values while the rest is fine-tuned).

    Returns
    -------
    TrainResult
    """
    _check_hyperparameters(
        train_set, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
        step_epochs=step_epochs, gamma=gamma, batch_size=batch_size, seed=seed,
        num_workers=num_workers,
    )
    metadata = _checked_metadata(metadata)
    device = torch.device(device)
    config = _train_config(
        train_set, val_set, epochs=epochs, lr=lr, momentum=momentum,
        weight_decay=weight_decay, step_epochs=step_epochs, gamma=gamma,
        batch_size=batch_size, seed=seed,
    )
    ckpt = _prepare_checkpoint_path(checkpoint_path)
    state_path = resume_state_path(ckpt) if ckpt is not None else None

    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        run = _start_training(
            model, train_set, device, seed=seed, lr=lr, momentum=momentum,
            weight_decay=weight_decay, step_epochs=step_epochs, gamma=gamma,
        )
        history: list[dict[str, float]] = []
        start = 0
        if state_path is not None and resume and state_path.exists():
            history, start = _restore_resume_state(run, state_path, config, epochs)
        train_loader, val_loader = _data_loaders(
            train_set, val_set, run, batch_size=batch_size, num_workers=num_workers
        )
        _run_epochs(
            run, train_loader, val_loader, history, start=start, epochs=epochs,
            progress=progress, after_step=after_step, state_path=state_path, config=config,
        )
        run.net.eval()

    unchanged = _save_final_checkpoint(
        ckpt, run.net, {**metadata, "history": history, "train_config": config},
        finished_before=start == epochs,
    )
    return TrainResult(
        model=run.net, history=history, resumed_from=start, checkpoint_path=ckpt,
        unchanged=unchanged,
    )


@dataclass(frozen=True, eq=False)
class _Training:
    """What one training run steps: the model copy, its optimizer and learning-rate
    schedule, the seeded generator that orders the batches, and the device."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.StepLR
    generator: torch.Generator
    device: torch.device


def _check_hyperparameters(
    train_set: Any, *, epochs: Any, lr: Any, momentum: Any, weight_decay: Any,
    step_epochs: Any, gamma: Any, batch_size: Any, seed: Any, num_workers: Any,
) -> None:
    """Every hyperparameter in its range and a non-empty training set, before any work."""
    for name, value in (("epochs", epochs), ("step_epochs", step_epochs),
                        ("batch_size", batch_size)):
        _check_positive(name, value, integer=True)
    _check_positive("lr", lr, integer=False)
    _check_positive("momentum", momentum, integer=False, allow_zero=True)
    _check_positive("weight_decay", weight_decay, integer=False, allow_zero=True)
    _check_positive("num_workers", num_workers, integer=True, allow_zero=True)
    _check_positive("gamma", gamma, integer=False)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FairDeployError(f"seed={seed!r} is not allowed: use an integer")
    if len(train_set) == 0:
        raise FairDeployError("train_set is empty: training needs at least one sample")


def _checked_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of the caller's checkpoint metadata, refused now (not after 100 epochs, when
    the checkpoint is written) if it sets a key train_model writes or holds a value a
    weights-only checkpoint cannot store."""
    metadata = dict(metadata or {})
    reserved = {"history", "train_config", "format", "version", "torch_version"} & metadata.keys()
    if reserved:
        raise ValueError(f"metadata may not set {sorted(reserved)}: train_model writes them")
    check_plain_value(metadata, "metadata")
    return metadata


def _train_config(
    train_set: Any, val_set: Any | None, *, epochs: int, lr: float, momentum: float,
    weight_decay: float, step_epochs: int, gamma: float, batch_size: int, seed: int,
) -> dict[str, Any]:
    """The run's configuration as the resume state and the checkpoint record it."""
    return {
        "epochs": epochs,
        "lr": float(lr),
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "step_epochs": step_epochs,
        "gamma": float(gamma),
        "batch_size": batch_size,
        "seed": seed,
        "train_size": len(train_set),
        # What the data holds, not only how much: a resume after the data changed at the
        # same path and size must not continue from weights trained on the old data.
        "data": _data_fingerprint(train_set, val_set),
    }


def _prepare_checkpoint_path(checkpoint_path: str | Path | None) -> Path | None:
    """The checkpoint path, checked safe to write, with its folder's stale temporaries gone."""
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None:
        _check_output(ckpt)
        # Leftovers of a run killed mid-write (its process is gone): every train run
        # removes them, not only the first write of this process in that folder.
        remove_stale(ckpt.parent)
    return ckpt


def _start_training(
    model: nn.Module, train_set: Any, device: torch.device, *, seed: int, lr: float,
    momentum: float, weight_decay: float, step_epochs: int, gamma: float,
) -> _Training:
    """A copy of ``model`` on ``device`` that takes the training inputs, with a fresh SGD
    optimizer, its StepLR schedule and the batch-order generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    net = copy.deepcopy(model).to(device)
    check_model_takes_inputs(net, train_set, what="the training split")
    optimizer = torch.optim.SGD(
        net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_epochs, gamma=gamma)
    return _Training(net, optimizer, scheduler, generator, device)


def _restore_resume_state(
    run: _Training, state_path: Path, config: Mapping[str, Any], epochs: int
) -> tuple[list[dict[str, float]], int]:
    """Load the resume state into ``run`` (weights, optimizer, schedule, RNG states);
    return the history so far and the number of epochs already done."""
    state = _load_resume_state(state_path, config, epochs)
    try:
        run.net.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise FairDeployError(
            f"the resume state {str(state_path)!r} does not fit this model ({exc}); "
            "delete it or train with resume=False (--no-resume)"
        ) from None
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    run.generator.set_state(state["rng"]["loader"])
    if run.device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"], run.device)
    return [dict(h) for h in state["history"]], int(state["epoch"])


def _data_loaders(
    train_set: Any, val_set: Any | None, run: _Training, *, batch_size: int, num_workers: int
) -> tuple[Any, Any | None]:
    """The shuffled training loader (ordered by ``run.generator``) and the validation
    loader (None without validation data)."""
    train_loader = _loader(train_set, batch_size, shuffle=True, generator=run.generator,
                           num_workers=num_workers, device=run.device)
    val_loader = (
        _loader(val_set, batch_size, shuffle=False, generator=None,
                num_workers=num_workers, device=run.device)
        if val_set is not None and len(val_set) > 0
        else None
    )
    return train_loader, val_loader


def _run_epochs(
    run: _Training, train_loader: Any, val_loader: Any | None,
    history: list[dict[str, float]], *, start: int, epochs: int, progress: bool,
    after_step: Callable[[nn.Module], None] | None, state_path: Path | None,
    config: Mapping[str, Any],
) -> None:
    """Train epochs ``start + 1 .. epochs``: after each, validate, refuse non-finite
    weights, append to ``history``, report, and save the resume state."""
    started = time.perf_counter()
    with phase("training", total=(epochs - start) * len(train_loader), unit="step",
               enabled=progress and start < epochs) as bar:
        bar.status(_status(history))
        for epoch in range(start, epochs):
            record = _train_epoch(run, train_loader, bar, epoch=epoch, epochs=epochs,
                                  after_step=after_step)
            if val_loader is not None:
                record["val_loss"], record["val_accuracy"] = _evaluate(
                    run.net, val_loader, run.device
                )
            _check_finite_weights(run.net, epoch)
            history.append(record)
            bar.status(_status(history))
            log(
                f"training: epoch {epoch + 1}/{epochs}: {_status(history, epoch=False)}, "
                f"lr {record['lr']:.3g}, {seconds(time.perf_counter() - started)} elapsed",
                enabled=progress,
            )
            if state_path is not None:
                _save_resume_state(run, state_path, config, epoch + 1, history)


def _train_epoch(
    run: _Training, train_loader: Any, bar: Any, *, epoch: int, epochs: int,
    after_step: Callable[[nn.Module], None] | None,
) -> dict[str, float]:
    """One pass over the training batches, then one scheduler step; return the epoch's
    record (``epoch``, ``lr``, ``train_loss``, ``train_accuracy``)."""
    net, optimizer, device = run.net, run.optimizer, run.device
    net.train()
    dtype = _param_dtype(net)
    steps = len(train_loader)
    epoch_lr = float(optimizer.param_groups[0]["lr"])
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for i, batch in enumerate(train_loader):
        x, y = _batch(batch, dtype, device, "train_set")
        logits = net(x)
        _check_labels(batch[1], logits, "train_set")
        loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            with torch.no_grad():
                after_step(net)
        loss_sum += loss.detach().double() * y.numel()
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.numel()
        if i % 10 == 9 or i == steps - 1:  # syncs with the device: not every step
            bar.status(f"epoch {epoch + 1}/{epochs} "
                       f"loss {float(loss_sum) / seen:.4f} "
                       f"acc {float(correct) / seen:.3f}")
        bar.advance()
    if not math.isfinite(float(loss_sum)):
        raise FairDeployError(
            f"training diverged: the loss is not finite (NaN or infinity) in epoch "
            f"{epoch + 1}; nothing of this epoch was saved. Lower the learning rate "
            "(--lr / train.lr), or check the data's scale"
        )
    run.scheduler.step()
    return {
        "epoch": epoch + 1,
        "lr": epoch_lr,
        "train_loss": float(loss_sum) / seen,
        "train_accuracy": float(correct) / seen,
    }


def _check_finite_weights(net: nn.Module, epoch: int) -> None:
    if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
        raise FairDeployError(
            f"training diverged: weights became non-finite in epoch {epoch + 1}; "
            "nothing of this epoch was saved. Lower the learning rate (--lr / "
            "train.lr), or check the data's scale"
        )


def _save_resume_state(run: _Training, state_path: Path, config: Mapping[str, Any],
                       epochs_done: int, history: list[dict[str, float]]) -> None:
    atomic_torch_save(
        {
            "format": _STATE_FORMAT,
            "epoch": epochs_done,
            "config": config,
            "state_dict": _cpu_state_dict(run.net),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": _rng_state(run.generator, run.device),
            "history": history,
        },
        state_path,
    )


def _save_final_checkpoint(ckpt: Path | None, net: nn.Module, extra: Mapping[str, Any], *,
                           finished_before: bool) -> bool:
    """Write the final checkpoint; return True when it was left as it was.

    A finished run asked again keeps its file: torch.save gives every file a new
    serialization id, so rewriting equal weights would change the checkpoint's SHA-256,
    and with it every cache key and run folder name that depends on it.
    """
    if ckpt is None:
        return False
    unchanged = finished_before and _same_checkpoint(ckpt, net, extra)
    if not unchanged:
        save_checkpoint(net, ckpt, extra=extra)
    return unchanged


def _same_checkpoint(path: Path, net: nn.Module, extra: Mapping[str, Any]) -> bool:
    """Whether ``path`` already holds exactly these weights and this training metadata."""
    if not path.is_file():
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state, meta = saved["state_dict"], saved["metadata"]
    except Exception:  # unreadable or foreign: write a fresh one
        return False
    current = net.state_dict()
    if not isinstance(state, dict) or state.keys() != current.keys():
        return False
    for k, v in current.items():
        w = state[k]
        if torch.is_tensor(v) != torch.is_tensor(w):
            return False
        if torch.is_tensor(v):
            v = v.detach().cpu()
            if v.dtype != w.dtype or v.shape != w.shape or not torch.equal(v, w):
                return False
        elif v != w:
            return False
    return all(meta.get(k) == v for k, v in extra.items())


def _check_output(ckpt: Path) -> None:
    """The checkpoint path may be new, or a checkpoint fairdeploy wrote (it is replaced):
    anything else there (a data file, a recipe, another tool's checkpoint) is the user's
    and is never overwritten."""
    from fairdeploy.checkpoint import checkpoint_metadata

    if ckpt.is_dir():
        raise FairDeployError(f"-o {str(ckpt)!r} is a folder: give the checkpoint's file path")
    if not ckpt.exists():
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = checkpoint_metadata(ckpt).get("format") == "fairdeploy-checkpoint"
    except FairDeployError:
        ours = False
    if not ours:
        raise FairDeployError(
            f"-o {str(ckpt)!r} exists and is not a checkpoint written by fairdeploy train: give "
            "a new path, or move that file away first (it is never overwritten)"
        )


def _data_fingerprint(train_set: Any, val_set: Any | None) -> str:
    """SHA-256 of the training and validation data's content, as the feature cache keys it
    (:func:`fairdeploy.cache.dataset_fingerprint`: labels, groups, and the input tensor's
    bytes or each image file's size and modification time). A custom dataset without
    ``targets``/``groups`` arrays is fingerprinted by its length only."""
    from fairdeploy.cache import dataset_fingerprint

    parts = []
    for ds in (train_set, val_set):
        if ds is None:
            parts.append("none")
        elif hasattr(ds, "targets") and hasattr(ds, "groups"):
            parts.append(dataset_fingerprint(ds))
        else:
            parts.append(f"len={len(ds)}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _status(history: list[dict[str, float]], *, epoch: bool = True) -> str:
    """The last epoch in words: ``loss 0.4123, accuracy 0.812, val accuracy 0.801``."""
    if not history:
        return ""
    h = history[-1]
    s = f"epoch {h['epoch']} " if epoch else ""
    s += f"loss {h['train_loss']:.4f}, accuracy {h['train_accuracy']:.3f}"
    if "val_accuracy" in h:
        s += f", val loss {h['val_loss']:.4f}, val accuracy {h['val_accuracy']:.3f}"
    return s
