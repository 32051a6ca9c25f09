"""Training loop for multi-exit networks, in the style of torchvision's reference scripts.

Plain functions (``train_one_epoch``, ``evaluate``, ``fit``: set-up in ``setup``, the epoch loop
here, then export and calibration) and plain-dict checkpoints (``checkpoint``). Each epoch's
randomness (shuffling, crops, flips, dropout) is derived from (seed, epoch), so a run resumed from its
checkpoint continues exactly as the uninterrupted run would have. Under ``torchrun`` the model is
wrapped in DistributedDataParallel with a DistributedSampler; only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import time

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from branchy_tee.core.errors import BranchyError
from branchy_tee.models.rundir import read_model_card, write_model_card, write_weights
from branchy_tee.train import attach
from branchy_tee.train.checkpoint import save_checkpoint, state_digest
from branchy_tee.train.config import TrainConfig, jsonable
from branchy_tee.train.losses import multi_exit_loss
from branchy_tee.train.setup import Run, seed_epoch, set_up

__all__ = ["TrainConfig", "fit", "train_one_epoch", "evaluate", "distill_alpha"]


class NonFiniteLoss(Exception):
    pass


# --------------------------------------------------------------------------- loops
class ExitMetrics:
    """Running loss and per-exit accuracy over the batches of one pass (training or validation)."""

    def __init__(self) -> None:
        self.total, self.seen = 0.0, 0
        self.correct: list[int] = []

    def update(self, loss: torch.Tensor, outputs: list[torch.Tensor], y: torch.Tensor) -> None:
        n = len(y)
        self.seen += n
        self.total += float(loss.detach()) * n
        hits = [int((o.argmax(1) == y).sum()) for o in outputs]
        self.correct = hits if not self.correct else [a + b for a, b in zip(self.correct, hits, strict=True)]

    @property
    def loss(self) -> float:
        return self.total / max(self.seen, 1)

    @property
    def exit_accuracy(self) -> list[float]:
        return [c / max(self.seen, 1) for c in self.correct]

    def result(self) -> dict:
        return {"loss": self.loss, "exit_accuracy": self.exit_accuracy, "samples": self.seen}


def distill_alpha(cfg: TrainConfig, progress: float) -> float:
    """The distillation weight after ``progress`` epochs: ramped up linearly over the warm-up."""
    if cfg.distill_warmup <= 0:
        return cfg.alpha
    return cfg.alpha * min(1.0, progress / cfg.distill_warmup)


LOG_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal (logs)


def _batches(loader, max_batches: int | None, desc: str, show: bool):
    """The loader's first ``max_batches`` batches, with a progress bar (rate and ETA) on a terminal,
    and a progress line every LOG_EVERY seconds in logs."""
    import sys

    from tqdm import tqdm

    num_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    bar = tqdm(loader, total=num_batches, desc=desc, leave=False, disable=None if show else True)
    logging = show and not sys.stderr.isatty()
    start = last = time.monotonic()
    for i, batch in enumerate(bar):
        if i >= num_batches:
            break
        now = time.monotonic()
        if logging and i and now - last >= LOG_EVERY:
            rate = i / (now - start)
            print(
                f"{desc}: batch {i}/{num_batches}, {rate:.1f} batches/s, ETA {(num_batches - i) / rate:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            last = now
        yield i, num_batches, bar, batch


def _teacher_logits(cfg: TrainConfig, outputs, teacher, x):
    if cfg.distill == "final":
        return outputs[-1]  # detached inside the loss
    if cfg.distill == "teacher":
        with torch.no_grad():
            return teacher(x)[-1]
    return None


def train_one_epoch(
    model, loader, optimizer, cfg: TrainConfig, device, epoch: int, teacher=None, show=True, frozen=False
) -> dict:
    attach.set_train_mode(model, frozen)
    metrics = ExitMetrics()
    for i, num_batches, bar, (x, y) in _batches(loader, cfg.max_batches, f"epoch {epoch + 1} train", show):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        outputs = model(x)
        weights = cfg.exit_weights or [1.0] * len(outputs)
        alpha = distill_alpha(cfg, epoch + i / num_batches)
        loss, _ = multi_exit_loss(
            outputs, y, weights, alpha, cfg.temperature, _teacher_logits(cfg, outputs, teacher, x)
        )
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss.item()} at epoch {epoch + 1}, batch {i + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        metrics.update(loss, outputs, y)
        bar.set_postfix(loss=f"{metrics.loss:.3f}", acc="/".join(f"{100 * a:.0f}" for a in metrics.exit_accuracy))
    return metrics.result()


@torch.no_grad()
def evaluate(model, loader, cfg: TrainConfig, device, max_batches: int | None = None, show=True) -> dict:
    """Validation loss (the same loss as training, so early stopping watches what is optimised; the
    final exit is the teacher whenever distillation is on) and per-exit accuracy."""
    model.eval()
    metrics = ExitMetrics()
    for _, _, _, (x, y) in _batches(loader, max_batches, "validate", show):
        x, y = x.to(device), y.to(device)
        outputs = model(x)
        weights = cfg.exit_weights or [1.0] * len(outputs)
        teacher_logits = outputs[-1] if cfg.distill != "none" else None
        loss, _ = multi_exit_loss(outputs, y, weights, cfg.alpha, cfg.temperature, teacher_logits)
        metrics.update(loss, outputs, y)
    return metrics.result()


def _run_epoch(run: Run, epoch: int, t0: float) -> dict:
    """Train one epoch, validate, keep the best model; the epoch's record (metrics.jsonl)."""
    cfg, p = run.cfg, run.progress
    s = seed_epoch(cfg.seed, epoch)
    run.generators[0].manual_seed(s)
    run.generators[1].manual_seed(s + 1)
    if isinstance(run.sampler, DistributedSampler):
        run.sampler.set_epoch(epoch)
    try:
        tr = train_one_epoch(
            run.train_model, run.train_loader, run.optimizer, cfg, run.device, epoch, run.teacher, run.show, run.frozen
        )
    except NonFiniteLoss as e:
        kept = (
            f"the last good checkpoint ({run.ckpt_path}, epoch {epoch}) is kept"
            if epoch > 0
            else "no checkpoint was written"
        )
        raise BranchyError(f"{e}; training stopped, {kept}; try a lower --lr") from None
    if run.world > 1:
        # BatchNorm running statistics are updated from each rank's own batches; DDP only
        # re-broadcasts them at the next forward. Take rank 0's now so that validation and the
        # saved model are the same on every rank.
        for buf in run.model.buffers():
            dist.broadcast(buf, 0)
    va = evaluate(run.model, run.val_loader, cfg, run.device, cfg.max_batches, run.show)
    run.scheduler.step()
    improved = va["loss"] < p.best_loss
    if improved:
        p.best_loss, p.best_epoch, p.bad_epochs = va["loss"], epoch, 0
    else:
        p.bad_epochs += 1
    record = {
        "epoch": epoch + 1,
        "train_loss": tr["loss"],
        "train_exit_accuracy": tr["exit_accuracy"],
        "val_loss": va["loss"],
        "val_exit_accuracy": va["exit_accuracy"],
        "lr": run.scheduler.get_last_lr()[0],
        "best": improved,
        "seconds": round(time.time() - t0, 2),
    }
    if run.is_main:
        _write_epoch(run, epoch, record)
    return record


def _write_epoch(run: Run, epoch: int, record: dict) -> None:
    """Rank 0: the best weights and model card, the checkpoint, the metrics line, the progress line."""
    out, p = run.out, run.progress
    if record["best"]:
        write_weights(out / "model.safetensors", run.model)
        training = {
            **(run.card.training or {}),
            "best_epoch": epoch + 1,
            "val_loss": p.best_loss,
            "val_exit_accuracy": record["val_exit_accuracy"],
        }
        write_model_card(out, run.card.replace(training=training))
    progress = {"epoch": epoch, "best_loss": p.best_loss, "best_epoch": p.best_epoch, "bad_epochs": p.bad_epochs}
    save_checkpoint(run.ckpt_path, run.model, run.optimizer, run.scheduler, progress, jsonable(run.cfg))
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if run.show:
        accs = " ".join(f"{100 * a:.1f}" for a in record["val_exit_accuracy"])
        done = epoch + 1 - p.start_epoch
        left = record["seconds"] / done * (run.cfg.epochs - epoch - 1)
        print(
            f"epoch {epoch + 1}/{run.cfg.epochs}: train loss {record['train_loss']:.4f}, val loss "
            f"{record['val_loss']:.4f}, val acc per exit [{accs}]{' *' if record['best'] else ''} "
            f"({record['seconds']:.0f} s; at most {left:.0f} s left)",
            flush=True,
        )


def _finish(run: Run, history: list[dict], stopped_early: bool) -> dict:
    """Check that the ranks agree, export the best model's stage graphs and calibrate them."""
    p = run.progress
    summary = {
        "best_epoch": p.best_epoch + 1,
        "best_val_loss": p.best_loss,
        "stopped_early": stopped_early,
        "epochs_run": len(history),
        "world_size": run.world,
        "history": history,
    }
    if run.world > 1:
        digests = [None] * run.world
        dist.all_gather_object(digests, state_digest(run.model))
        summary["ddp_identical_weights"] = len(set(digests)) == 1
    if run.is_main and (run.out / "model.safetensors").is_file():
        from branchy_tee.evaluate.calibrate import calibrate_run
        from branchy_tee.export.onnx import export_run

        export_run(run.out, show=run.show)  # the stage graphs that calibration, evaluation and sealing use
        if run.world > 1:
            now = read_model_card(run.out)
            same = summary["ddp_identical_weights"]
            write_model_card(run.out, now.replace(training={**(now.training or {}), "ddp_identical_weights": same}))
        summary["calibration"] = calibrate_run(
            run.out,
            max_accuracy_drop=run.cfg.max_accuracy_drop,
            criterion=run.cfg.criterion,
            device=run.device,
            max_batches=run.cfg.max_batches,
            val_set=run.val_ds,
            show=run.show,
        )
    if run.world > 1:
        dist.barrier()
    return summary


def _warn_at_chance(run: Run, history: list[dict]) -> None:
    """A final exit no better than guessing trains and calibrates without an error: say so."""
    import sys

    chance = 1 / len(run.card.classes)
    best = max((h["val_exit_accuracy"][-1] for h in history), default=None)
    # within two standard errors of guessing, on this many validation images
    n = len(run.val_ds)  # type: ignore[arg-type]
    if best is not None and best < chance + 2 * math.sqrt(chance * (1 - chance) / max(1, n)):
        print(
            f"warning: the final exit is at chance ({100 * best:.1f}% on validation, chance {100 * chance:.1f}%): "
            "train longer, lower --lr, or check the data",
            file=sys.stderr,
        )


def fit(cfg: TrainConfig) -> dict:
    """Train, keep the best model (lowest validation loss) in ``cfg.out``, calibrate it; return a summary."""
    run = set_up(cfg)
    history: list[dict] = []
    stopped_early = False
    t0 = time.time()
    for epoch in range(run.progress.start_epoch, cfg.epochs):
        history.append(_run_epoch(run, epoch, t0))
        if run.progress.bad_epochs >= cfg.patience:
            stopped_early = True
            if run.show:
                print(
                    f"early stop: no validation improvement for {cfg.patience} epochs "
                    f"(best epoch {run.progress.best_epoch + 1})"
                )
            break
    if run.show:
        _warn_at_chance(run, history)
    return _finish(run, history, stopped_early)
