"""Train the embedded digits DiT with ``Trainer.fit`` and write its weights into the package.

Run ``python -m lightning_dit_parallel.app.digits.train`` (2800 steps; about ten minutes on one free CPU core,
14 minutes on a busy 2-core machine). The defaults reproduce the shipped weights. The weights written are the
exponential moving average (EMA) of the trained ones, as DiT does.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from lightning_dit_parallel.app.digits.data import NUM_CLASSES, DigitImages
from lightning_dit_parallel.app.digits.model import (
    CONFIG_FILE,
    DIGITS_DIT_CONFIG,
    DIGITS_SCHEDULE,
    WEIGHTS_FILE,
    build_digits_dit,
    weights_dir,
)

log = logging.getLogger("lightning_dit_parallel.app.digits.train")


def disable_builtin_label_dropout(model: nn.Module) -> None:
    """diffusers' DiT drops class labels inside every block independently (``LabelEmbedding.dropout_prob``), so
    the all-unconditional model that guidance needs is almost never trained; drop labels once per sample instead
    (``DigitsDiTTraining.class_dropout``). The null-class row of the embedding table stays."""
    for module in model.modules():
        if hasattr(module, "token_drop") and hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0


class DigitsDiTTraining(L.LightningModule):
    """Epsilon-prediction DDPM training of a class-conditional DiT with label dropout for guidance.

    Args:
        config: ``DiTTransformer2DModel`` arguments.
        schedule: ``DDPMScheduler`` arguments (the noise schedule).
        lr: AdamW learning rate (after a linear warm-up of ``warmup_steps``).
        class_dropout: probability that a sample's label is replaced by the null class ``NUM_CLASSES``.
        ema_decay: decay of the weight average that is saved.
        warmup_steps: steps of linear learning-rate warm-up.
    """

    def __init__(
        self,
        config: dict[str, Any] = DIGITS_DIT_CONFIG,
        schedule: dict[str, Any] = DIGITS_SCHEDULE,
        lr: float = 1e-3,
        class_dropout: float = 0.1,
        ema_decay: float = 0.998,
        warmup_steps: int = 200,
    ) -> None:
        super().__init__()
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}.")
        self.config = dict(config)
        self.schedule = dict(schedule)
        self.model = build_digits_dit(self.config)
        disable_builtin_label_dropout(self.model)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.noise_scheduler = DDPMScheduler(**self.schedule)
        self.lr = lr
        self.class_dropout = class_dropout
        self.warmup_steps = warmup_steps

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch  # (B, 1, H, W), (B,)
        noise = torch.randn_like(images)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (images.shape[0],), device=images.device)
        noisy = self.noise_scheduler.add_noise(images, noise, t)
        dropped = torch.rand(labels.shape, device=labels.device) < self.class_dropout
        labels = torch.where(dropped, torch.full_like(labels, NUM_CLASSES), labels)
        pred = self.model(noisy, timestep=t, class_labels=labels, return_dict=False)[0]  # (B, 1, H, W)
        loss = F.mse_loss(pred, noise)
        self.log("loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.ema.update_parameters(self.model)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / self.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The averaged weights, with the key names of the bare ``DiTTransformer2DModel``."""
        return {k: v.detach().contiguous().clone() for k, v in self.ema.module.state_dict().items()}


class LossLog(L.Callback):
    """Logs the mean loss and the elapsed time every ``every`` steps (training runs without a progress bar)."""

    def __init__(self, every: int = 50) -> None:
        self.every = every
        self.losses: list[float] = []
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))
        step = trainer.global_step
        if step % self.every == 0:
            recent = self.losses[-self.every :]
            log.info(
                f"step {step} epoch {trainer.current_epoch} loss {sum(recent) / len(recent):.4f} "
                f"elapsed {time.perf_counter() - self.start:.0f}s"
            )


def save_weights(module: DigitsDiTTraining, directory: Path, training: dict[str, Any]) -> None:
    """Write ``digits_dit.safetensors`` (EMA weights) and ``digits_dit.json`` (config, schedule, training facts)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(module.ema_state_dict(), str(directory / WEIGHTS_FILE))
    meta = {"transformer": module.config, "schedule": module.schedule, "training": training}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def train(
    epochs: int = 100,
    batch_size: int = 64,
    lr: float = 1e-3,
    class_dropout: float = 0.1,
    ema_decay: float = 0.998,
    seed: int = 0,
    out: Path | None = None,
) -> DigitsDiTTraining:
    """Train with ``Trainer.fit`` on one CPU process and save the EMA weights to ``out`` (default: the package)."""
    L.seed_everything(seed, workers=True)
    module = DigitsDiTTraining(lr=lr, class_dropout=class_dropout, ema_decay=ema_decay)
    loader = DataLoader(DigitImages(), batch_size=batch_size, shuffle=True, drop_last=True)
    losses = LossLog()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[losses],
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    training = dict(
        epochs=epochs,
        steps=trainer.global_step,
        batch_size=batch_size,
        lr=lr,
        class_dropout=class_dropout,
        ema_decay=ema_decay,
        seed=seed,
        seconds=round(seconds, 1),
        threads=torch.get_num_threads(),
        final_loss=round(sum(losses.losses[-100:]) / max(1, len(losses.losses[-100:])), 4),
        data="sklearn load_digits, bilinear 8x8 -> 16x16, [-1, 1]",
    )
    save_weights(module, out or weights_dir(), training)
    log.info(f"trained {trainer.global_step} steps in {seconds:.0f}s; weights in {out or weights_dir()}")
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--class-dropout", type=float, default=0.1)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (on a shared CPU one thread is fastest)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the weights (default: the package)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    torch.set_num_threads(args.threads)
    train(args.epochs, args.batch_size, args.lr, args.class_dropout, args.ema_decay, args.seed, args.out)


if __name__ == "__main__":
    main()
