"""SRDD: per-layer quantization detectors, scans, loss attribution and recommendations."""
