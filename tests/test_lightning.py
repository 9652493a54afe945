"""The PyTorch Lightning callback, with a real Trainer on a tiny model for a few CPU steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from nhwc_audit import ChannelsLastError  # noqa: E402
from nhwc_audit.integrations.lightning import ChannelsLastAudit  # noqa: E402


class Tiny(pl.LightningModule):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.InstanceNorm2d(8)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return ((self(x) - y) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path: Path, callback: ChannelsLastAudit) -> Tiny:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 1, 16, 16, generator=g)
    )
    trainer = pl.Trainer(
        max_steps=3,
        callbacks=[callback],
        logger=pl.loggers.CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    model = Tiny()
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    return model


def test_the_first_batch_is_audited_at_its_real_shape_and_logged(tmp_path: Path) -> None:
    callback = ChannelsLastAudit(bandwidth=1e9)
    _fit(tmp_path, callback)
    report = callback.report
    assert report is not None and report.meta.inputs[0].shape == (4, 3, 16, 16) and report.meta.backward
    assert ("norm", "revert") in [(f.node, f.kind.value) for f in report.findings]
    assert callback.report_path is not None and callback.report_path.is_file()
    (metrics,) = list(tmp_path.glob("run/*/metrics.csv"))
    header = metrics.read_text().splitlines()[0]
    assert "nhwc_audit/findings" in header and "nhwc_audit/reverts" in header


def test_fail_on_stops_the_run_before_the_first_step(tmp_path: Path) -> None:
    callback = ChannelsLastAudit(fail_on="revert", bandwidth=1e9)
    with pytest.raises(ChannelsLastError, match="Tiny does not stay channels_last"):
        _fit(tmp_path, callback)


def test_a_bad_fail_on_fails_when_the_callback_is_made() -> None:
    from nhwc_audit.errors import UsageError

    with pytest.raises(UsageError, match="fail_on=None is not one of"):
        ChannelsLastAudit(fail_on=None)  # type: ignore[arg-type]
