"""Shared fixtures: the tiny test models, seeded sample inputs and an audit at a fixed bandwidth."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from nhwc_audit import AuditReport, audit
from tests.support import BANDWIDTH

pytest_plugins = ("pytester",)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/*.json from this run")


@pytest.fixture(autouse=True)
def _threads_put_back() -> Any:
    """The CPU thread count each test found, put back after it: tests that pin one thread (CPU kernel
    paths depend on it) left it so for every test after them, whose Conv3d layouts then depended on the
    order tests ran in (``pytest tests/propagate tests/fix`` failed two repairs of 3D models)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def audit_fixed() -> Callable[..., AuditReport]:
    """``nhwc_audit.audit`` at the fixed test bandwidth."""
    return functools.partial(audit, bandwidth=BANDWIDTH)


@pytest.fixture
def sample() -> Callable[..., torch.Tensor]:
    """A seeded random input of the given shape: ``sample(1, 3, 8, 8)``."""

    def make(*shape: int, seed: int = 0) -> torch.Tensor:
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture
def unet_example() -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """The bundled example UNet (random weights, seeded) and its 1x3x128x128 sample."""
    from nhwc_audit.examples import unet

    return unet()
