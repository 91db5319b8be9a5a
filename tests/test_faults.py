"""Faults, misuse and concurrency (issue 15): nested and reused injectors, baseline files under
concurrent writers and ``kill -9``, corrupt caches.  Each case failed before the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.inject import QuantInjector
from harness.models import load_model


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return load_model("tiny-llama")[0]


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(3, 35).reshape(2, 16)).logits


def test_nested_injectors_inner_wins_and_outer_comes_back(tiny: nn.Module) -> None:
    ref = _logits(tiny)
    with QuantInjector(tiny, "nvfp4"):
        nvfp4_alone = _logits(tiny)
    with QuantInjector(tiny, "mxfp4"):
        mxfp4_alone = _logits(tiny)
    weights = {n: p for n, p in tiny.named_parameters()}
    with QuantInjector(tiny, "mxfp4"):
        with QuantInjector(tiny, "nvfp4"):
            inner = _logits(tiny)
        after_inner = _logits(tiny)
    # inner: nvfp4 on the original weights (not nvfp4 of mxfp4); after it: mxfp4 again, not the reference
    assert torch.equal(inner, nvfp4_alone)
    assert torch.equal(after_inner, mxfp4_alone)
    assert not torch.equal(after_inner, ref)
    assert torch.equal(_logits(tiny), ref)
    assert all(p is weights[n] for n, p in tiny.named_parameters())  # the same Parameters are back


def test_reusing_one_injector_does_not_double_its_modules(tiny: nn.Module) -> None:
    inj = QuantInjector(tiny, "mxfp4")
    with inj:
        first = list(inj.modules)
    with inj:
        second = list(inj.modules)
    assert len(first) == 14 and second == first  # 2 layers x 7 Linear, lm_head excluded


def test_a_model_without_linear_layers_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"Sequential has no nn.Linear module"):
        QuantInjector(nn.Sequential(nn.Conv1d(2, 2, 1)), "mxfp4").__enter__()
