"""Measured forward (and forward+backward with --train) time of NCHW, naive channels_last and
repaired channels_last, side by side in one process, for the bundled UNet example, MONAI UNet
(2D) and resnet50.

    python benchmarks/speed.py [--train] [--rounds 7]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from nhwc_audit import audit


def models() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    from nhwc_audit.examples import unet
    from nhwc_audit.zoo.models import build

    m, (x,) = unet()
    out = [("examples.unet 1x3x128x128", m, x)]
    mm, (mx,), _ = build("monai.UNet2d")
    out.append(("monai UNet2d 1x1x128x128", mm, torch.randn(1, 1, 128, 128)))
    rm, (rx,), _ = build("torchvision.resnet50")
    out.append(("resnet50 1x3x224x224", rm, rx))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train", action="store_true")
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {'forward+backward' if a.train else 'forward'}"
    )
    print("| model | NCHW | channels_last | repaired | CL/NCHW | repaired/NCHW | bytes before -> after repair |")
    print("|---|---|---|---|---|---|---|")
    for name, model, x in models():
        r = audit(model, x, bandwidth=1e10).repaired().measure(train=a.train, rounds=a.rounds)
        m = r.measurement
        assert m is not None and r.repair is not None
        t = {tm.variant: tm for tm in m.timings}
        cells = [
            f"{t[v].median * 1e3:.1f} ms ({t[v].low * 1e3:.1f}-{t[v].high * 1e3:.1f})"
            for v in ("nchw", "channels_last", "repaired")
        ]
        print(
            f"| {name} | {' | '.join(cells)} | {m.speedup('channels_last'):.2f}x | {m.speedup('repaired'):.2f}x | "
            f"{r.repair.bytes_before / 1e6:.1f} MB -> {r.repair.bytes_after / 1e6:.1f} MB |"
        )


if __name__ == "__main__":
    main()
