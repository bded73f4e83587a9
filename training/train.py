"""The training loop: augmentation on the fly, SGD with warm-up and decay, label smoothing, weight EMA."""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from training.config import TrainConfig
from training.data import LabelledImages


@dataclass
class History:
    """One row per epoch; plotted as curves and saved in metrics.json."""

    rows: list[dict] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def augment(x: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random mirror, translation (reflect padding) and cutout, drawn per image."""
    n, _, height, width = x.shape
    device = x.device
    if config.flip:
        mirror = torch.rand(n, device=device, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    if config.translate:
        pad = config.translate
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=device, generator=generator)
        rows = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=device)[None, :, None, None]
        x = padded[batch, channels, rows, cols]
    if config.cutout:
        size = config.cutout
        cy = torch.randint(0, height, (n,), device=device, generator=generator) - size // 2
        cx = torch.randint(0, width, (n,), device=device, generator=generator) - size // 2
        ys = torch.arange(height, device=device)[None, :]
        xs = torch.arange(width, device=device)[None, :]
        in_rows = (ys >= cy[:, None]) & (ys < cy[:, None] + size)
        in_cols = (xs >= cx[:, None]) & (xs < cx[:, None] + size)
        x = x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0.0)
    return x


def cutmix(x: torch.Tensor, targets: torch.Tensor, probability: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """With ``probability``, paste a random box from a shuffled copy of the batch into every image (CutMix).

    Returns the images, the pasted images' targets and the share of each image that stayed its own; the loss weighs
    the two targets by area. Unmixed batches come back as they were, with a share of 1.
    """
    device = x.device
    if probability <= 0 or float(torch.rand((), device=device, generator=generator)) >= probability:
        return x, targets, 1.0
    n, _, height, width = x.shape
    # Box area ~ uniform(0, 1) of the image: Beta(1, 1), drawn with the run's generator so runs repeat.
    area = float(torch.rand((), device=device, generator=generator))
    box_h, box_w = round(height * math.sqrt(area)), round(width * math.sqrt(area))
    top = int(torch.randint(0, height - box_h + 1, (), device=device, generator=generator))
    left = int(torch.randint(0, width - box_w + 1, (), device=device, generator=generator))
    partner = torch.randperm(n, device=device, generator=generator)
    mixed = x.clone()
    mixed[:, :, top:top + box_h, left:left + box_w] = x[partner, :, top:top + box_h, left:left + box_w]
    return mixed, targets[partner], 1.0 - box_h * box_w / (height * width)


def regularised_share(config: TrainConfig, epoch: int) -> float:
    """How far ``epoch`` (1-based) is into the epochs that CutMix and the teacher act on: the focus epochs, or all
    epochs when there are none. 0 before them, then rising linearly to 1 at the last epoch."""
    span = config.focus_epochs or config.epochs
    into = epoch - (config.epochs - span)
    return into / span if into > 0 else 0.0


def self_distill_share(config: TrainConfig, epoch: int) -> float:
    """The EMA teacher's share of the target in ``epoch``: rising linearly to ``self_distill``."""
    return config.self_distill * regularised_share(config, epoch)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decayed = [p for p in model.parameters() if p.ndim > 1]
    not_decayed = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD(
        [{"params": decayed, "weight_decay": config.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then linear decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor, device: torch.device, batch_size: int = 1000,
                   channels_last: bool = False) -> torch.Tensor:
    model.eval()
    outputs = []
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start:start + batch_size].to(device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        outputs.append(model(batch).float().cpu())
    return torch.cat(outputs)


class CheckpointError(ValueError):
    """A checkpoint that cannot continue this run."""


def save_checkpoint(path: Path, **state) -> None:
    """Everything needed to go on after ``state['epoch']``; written whole or not at all."""
    staging = path.with_name(path.name + ".partial")
    torch.save(state, staging)
    os.replace(staging, path)


def changed_settings(saved: dict, config: TrainConfig) -> dict:
    return {name: [saved.get(name), value] for name, value in config.to_dict().items() if saved.get(name) != value}


def fit(config: TrainConfig, train: LabelledImages, train_inputs: np.ndarray, val: LabelledImages,
        val_inputs: np.ndarray, model: nn.Module, product_classes: int,
        progress: bool = True, checkpoint: Path | None = None) -> tuple[nn.Module, History, dict]:
    """Train ``model`` on normalised inputs; return the model to export (the EMA when enabled) and the history.

    With ``checkpoint``, the whole training state is saved there after every epoch, and a run that finds the file
    goes on from where it stopped (bit for bit, under the same settings).
    """
    device = pick_device()
    if config.threads and device.type == "cpu":
        torch.set_num_threads(config.threads)
    use_bf16 = config.bf16 and bf16_supported(device)
    channels_last = config.arch == "convnet"
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
           if config.ema_decay > 0 else None)
    optimizer = make_optimizer(model, config)
    x_train = torch.from_numpy(train_inputs).to(device)
    y_train = torch.from_numpy(train.labels).to(device)
    x_val = torch.from_numpy(val_inputs)
    y_val = torch.from_numpy(val.labels)
    # The last focus_epochs see only the product labels (see TrainConfig.focus_epochs).
    everything = torch.arange(len(x_train), device=device)
    product_only = everything[y_train < product_classes]
    first_focus_epoch = config.epochs - config.focus_epochs + 1
    pools = [product_only if epoch >= first_focus_epoch else everything for epoch in range(1, config.epochs + 1)]
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    total_steps = sum(math.ceil(len(pool) / config.batch_size) for pool in pools)
    warmup_steps = max(1, int(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    history = History()
    first_epoch, earlier_seconds, resumed = 1, 0.0, None
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)  # written by this code, below
        if state["images"] != len(x_train) or state["epoch"] >= config.epochs:
            raise CheckpointError(f"{checkpoint} is from another run ({state['images']} training images, "
                                  f"{state['epoch']} epochs done); delete it or pass another --checkpoint.")
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"].cpu())  # a byte tensor on the CPU, whatever the device
        history.rows = state["history"]
        first_epoch, earlier_seconds = state["epoch"] + 1, state["seconds"]
        resumed = {"after_epoch": state["epoch"], "changed": changed_settings(state["config"], config)}
        print(f"resuming after epoch {state['epoch']} from {checkpoint}"
              + (f"; changed since: {resumed['changed']}" if resumed["changed"] else ""))
    started = time.perf_counter() - earlier_seconds
    bar = tqdm(total=total_steps, unit="step", disable=not progress, dynamic_ncols=True)
    bar.update(sum(math.ceil(len(pool) / config.batch_size) for pool in pools[:first_epoch - 1]))
    for epoch, pool in enumerate(pools[first_epoch - 1:], start=first_epoch):
        model.train()
        focused = epoch >= first_focus_epoch
        mixing = config.cutmix if regularised_share(config, epoch) else 0.0
        teacher_share = self_distill_share(config, epoch) if ema is not None else 0.0
        if teacher_share:
            ema.module.eval()
        order = pool[torch.randperm(len(pool), device=device, generator=generator)]
        loss_sum, correct, seen = 0.0, 0, 0
        bar.set_description(f"epoch {epoch}/{config.epochs}{' (focus)' if focused else ''}")
        for step in range(math.ceil(len(pool) / config.batch_size)):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            inputs = augment(x_train[index], config, generator)
            targets = y_train[index]
            inputs, pasted_targets, kept = cutmix(inputs, targets, mixing, generator)
            if channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = model(inputs)
                if focused:
                    logits = logits[:, :product_classes]
                scores = logits.float()
                loss = kept * F.cross_entropy(scores, targets, label_smoothing=config.label_smoothing)
                if kept < 1.0:
                    loss = loss + (1.0 - kept) * F.cross_entropy(scores, pasted_targets,
                                                                 label_smoothing=config.label_smoothing)
                if teacher_share:
                    with torch.no_grad():
                        taught = torch.softmax(ema.module(inputs)[:, :scores.shape[1]].float(), dim=1)
                    loss = (1.0 - teacher_share) * loss + teacher_share * F.cross_entropy(scores, taught)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            loss_sum += loss.item() * len(index)
            correct += (logits.argmax(1) == targets).sum().item()
            seen += len(index)
            bar.update()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        evaluated = ema.module if ema is not None else model
        val_logits = predict_logits(evaluated, x_val, device, channels_last=channels_last)[:, :product_classes]
        val_loss = F.cross_entropy(val_logits, y_val).item()
        val_acc = (val_logits.argmax(1) == y_val).float().mean().item()
        history.add(epoch=epoch, focus=focused, train_loss=loss_sum / seen, train_accuracy=correct / seen,
                    val_loss=val_loss, val_accuracy=val_acc, lr=scheduler.get_last_lr()[0],
                    seconds=time.perf_counter() - started)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", val_acc=f"{val_acc:.4f}")
        bar.write(f"epoch {epoch:3d}  train loss {loss_sum / seen:.4f} acc {correct / seen:.4f}  "
                  f"val loss {val_loss:.4f} acc {val_acc:.4f}  ({time.perf_counter() - started:.0f} s)")
        if checkpoint is not None:
            save_checkpoint(checkpoint, epoch=epoch, images=len(x_train), config=config.to_dict(),
                            model=model.state_dict(), ema=ema.state_dict() if ema is not None else None,
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            generator=generator.get_state(), history=history.rows,
                            seconds=time.perf_counter() - started)
    bar.close()
    final = copy.deepcopy(ema.module if ema is not None else model).float().to("cpu")
    final = final.to(memory_format=torch.contiguous_format).eval()
    run_info = {"device": str(device), "bf16": use_bf16, "wall_time_s": round(time.perf_counter() - started, 1),
                "steps": total_steps}
    if resumed is not None:
        run_info["resumed"] = resumed
    return final, history, run_info
