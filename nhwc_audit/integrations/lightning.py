"""A PyTorch Lightning callback that audits the model on the first training batch, at the real
batch shape, dtype and autocast setting, before the first step changes any weight.

    trainer = pl.Trainer(callbacks=[ChannelsLastAudit(fail_on="revert")])

Needs ``pytorch-lightning`` 2.x (the ``lightning`` extra); importing it costs nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from ..api import audit, fail_on_kinds
from ..records import FailOn
from ..report.text import headline
from ..result import AuditReport, channels_last_error

__all__ = ["ChannelsLastAudit"]


def _first_tensor(batch: Any) -> tuple[Any, ...]:
    """The model's inputs in a batch: the batch itself if it is a tensor, else its first item."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],)
    if isinstance(batch, dict) and batch:
        return (next(iter(batch.values())),)
    raise ValueError(f"cannot find the model's input in a batch of type {type(batch).__name__}: pass inputs=")


def _autocast(precision: str) -> bool | torch.dtype:
    if precision.startswith("bf16") and "mixed" in precision:
        return torch.bfloat16
    if precision.startswith("16") and "mixed" in precision:
        return torch.float16
    return False


class ChannelsLastAudit(pl.Callback):  # type: ignore[misc]  # pytorch_lightning is untyped here
    """Audit ``pl_module`` on the first training batch; log the summary and the report path
    through the trainer's logger; with ``fail_on`` ('revert' or 'any') stop the run when the
    audit finds what it names. ``inputs`` maps a batch to the model's positional inputs
    (default: the batch, or its first item). ``options`` go to :func:`nhwc_audit.audit`."""

    def __init__(
        self,
        *,
        fail_on: FailOn = "never",
        inputs: Callable[[Any], tuple[Any, ...]] | None = None,
        report_name: str = "nhwc-audit",
        **options: Any,
    ) -> None:
        super().__init__()
        fail_on_kinds(fail_on)  # a bad value fails here, not after the first batch's audit
        self.fail_on: FailOn = fail_on
        self.inputs = inputs or _first_tensor
        self.report_name = report_name
        self.options = options
        self.report: AuditReport | None = None
        """The audit, once the first batch has been seen."""
        self.report_path: Path | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.report is not None or batch_idx != 0:
            return
        options = {"autocast": _autocast(str(trainer.precision)), "train": True, **self.options}
        report = audit(pl_module, tuple(self.inputs(batch)), name=type(pl_module).__name__, **options)
        self.report = report
        folder = Path(trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.report_path = report.save_html(folder / f"{self.report_name}.html")
        rank_zero_info(f"nhwc-audit: {headline(report.meta, report.summary)}\nnhwc-audit: report {self.report_path}")
        s = report.summary
        metrics = {
            "nhwc_audit/findings": float(s.findings),
            "nhwc_audit/reverts": float(s.reverts),
            "nhwc_audit/breaks": float(s.breaks + s.latent_breaks),
            "nhwc_audit/bytes_moved": float(s.bytes_moved),
            "nhwc_audit/channels_last_byte_share": s.channels_last_byte_share,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        offenders = report.offenders(fail_on_kinds(self.fail_on))
        if offenders:  # the report's path is in the log line above
            raise channels_last_error(report, offenders)
