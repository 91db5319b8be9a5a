"""Memoized SRDD scans of the model under test, shared by the cases of the srdd suite."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest

from harness.modelview import ModelView
from harness.srdd import scan
from harness.srdd.criteria import LayerFinding, Thresholds, layer_findings


@pytest.fixture(scope="session")
def weight_scan_of(model_under_test) -> Callable[[str], scan.ScanResult]:
    """``weight_scan_of(fmt)``: every target weight of the model against ``fmt`` (memoized)."""
    model = model_under_test.model

    @functools.cache
    def run(fmt: str) -> scan.ScanResult:
        result = scan.ScanResult()
        scan.weight_scan(model, fmt, result)
        return result

    return run


@pytest.fixture(scope="session")
def input_scan_of(model_under_test, calibration_items) -> Callable[[str], scan.ScanResult]:
    """``input_scan_of(fmt)``: W16A4 activation scan on the 32 calibration texts (memoized)."""
    model, tok = model_under_test.model, model_under_test.tokenizer

    @functools.cache
    def run(fmt: str) -> scan.ScanResult:
        result = scan.ScanResult()
        scan.activation_scan(model, tok, calibration_items, fmt, "input", result)
        return result

    return run


@pytest.fixture(scope="session")
def findings_of(model_under_test) -> Callable[[scan.ScanResult], list[LayerFinding]]:
    model = model_under_test.model
    layers = ModelView(model).layer_names
    return lambda result: layer_findings(result, layers, Thresholds())
