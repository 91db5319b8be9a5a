"""The bandwidth table of ``fake_quantize``: per format and dtype, the time of one call on a
square tensor, the bytes it moves per second (input read plus output written) and its ratio to
``x.clone()`` of the same tensor timed in the same run (a copy is the memory-bound floor a
one-pass kernel can reach, so the ratio compares machines).  On CPU the table also gives the
ratio to ``out.copy_(x)`` into a buffer allocated once: ``clone`` and ``fake_quantize`` both
return a fresh tensor, whose page faults can dominate both (whether the allocator hands back
fresh or recycled pages depends on what ran before), while the warm copy is the floor without
them.

Timing: on CUDA ``triton.testing.do_bench`` (synchronised with CUDA events, L2 flushed between
runs, median); on CPU the median of ``timeit`` rounds. With ``--check`` each CUDA row also says
whether its first 256 rows equal the CPU reference path bit for bit (same generator seed); with
``--goal R`` the run fails (exit 1) unless every row is within R times ``clone`` (the
goals: 2 on the 2-core CPU at 4096x4096, 1.15 on a Hopper GPU at 8192x8192).

    python -m benchmarks.bandwidth --device cuda --size 8192 --check
    python -m benchmarks.bandwidth --device cpu --size 4096 --torchao --goal 2

(asv ignores this module: it defines no ``time_*``/``track_*`` benchmarks.)
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from harness.formats import fake_quantize, list_formats

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECK_ROWS = 256


def median_ms(fn: Callable[[], object], device: torch.device, rounds: int = 7) -> float:
    """Median milliseconds of one ``fn()`` call, synchronised on CUDA."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up (first call builds the C kernel)
    return statistics.median(timeit.repeat(fn, number=1, repeat=rounds)) * 1e3


def paired_ms(fn: Callable[[], object], x: torch.Tensor, rounds: int = 7) -> tuple[float, float, float | None]:
    """Median ms of ``fn()``, of ``x.clone()`` and (CPU only) of ``out.copy_(x)`` into a buffer
    allocated once. On CPU the three alternate round by round, so a shared machine's load changes
    them alike; on CUDA the first two are ``do_bench``ed (the caching allocator has no page faults)."""
    if x.device.type == "cuda":
        return median_ms(fn, x.device), median_ms(x.clone, x.device), None
    out = torch.empty_like(x)
    fns = (fn, x.clone, functools.partial(out.copy_, x))
    for f in fns:
        f()
    times = [[timeit.timeit(f, number=1) for f in fns] for _ in range(rounds)]
    fn_ms, clone_ms, copy_ms = (statistics.median(t[i] for t in times) * 1e3 for i in range(3))
    return fn_ms, clone_ms, copy_ms


@dataclass(frozen=True)
class Row:
    format: str
    dtype: str
    ms: float
    clone_ms: float
    copy_ms: float | None
    gb_per_s: float
    ratio_to_clone: float
    ratio_to_warm_copy: float | None
    bits_equal_cpu_reference: bool | None = None
    torchao_ratio_to_clone: float | None = None


def torchao_fake_quantize(name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchao's cast + dequantize of ``name`` (the suites' parity reference), None without it."""
    try:
        from suites.formats.test_torchao_parity import TORCHAO_ELEMENT, torchao_fake_quantize
    except BaseException:  # torchao missing: pytest.importorskip raises Skipped (a BaseException)
        return None
    if name not in TORCHAO_ELEMENT and name != "nvfp4":
        return None
    return lambda x: torchao_fake_quantize(x, name)


def torchao_ratio(ao: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    ms, clone_ms, _ = paired_ms(functools.partial(ao, x), x)
    return ms / clone_ms


def measure(
    size: int, device: torch.device, formats: list[str], dtypes: list[str], *, check: bool, torchao: bool
) -> list[Row]:
    rows = []
    base = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    for dtype in dtypes:
        x = base.to(device, DTYPES[dtype])
        for name in formats:
            run = functools.partial(fake_quantize, x, name, generator=torch.Generator().manual_seed(0))
            ms, clone_ms, copy_ms = paired_ms(run, x)
            equal = None
            if check:
                got = fake_quantize(x, name, generator=torch.Generator().manual_seed(0))[:CHECK_ROWS].cpu()
                want = fake_quantize(
                    x[:CHECK_ROWS].cpu(), name, generator=torch.Generator().manual_seed(0), backend="reference"
                )
                bits = {4: torch.int32, 2: torch.int16}[x.element_size()]
                equal = torch.equal(got.view(bits), want.view(bits))
            ao = torchao_fake_quantize(name) if torchao else None
            rows.append(
                Row(
                    format=name,
                    dtype=dtype,
                    ms=ms,
                    clone_ms=clone_ms,
                    copy_ms=copy_ms,
                    gb_per_s=2 * x.numel() * x.element_size() / ms / 1e6,
                    ratio_to_clone=ms / clone_ms,
                    ratio_to_warm_copy=ms / copy_ms if copy_ms else None,
                    bits_equal_cpu_reference=equal,
                    torchao_ratio_to_clone=torchao_ratio(ao, x) if ao else None,
                )
            )
    return rows


def markdown(rows: list[Row]) -> str:
    """One line per format, columns (x clone, [x warm copy,] GB/s) per dtype."""
    dtypes = list(dict.fromkeys(r.dtype for r in rows))
    warm = all(r.ratio_to_warm_copy for r in rows)
    cols = ["x clone", "x warm copy", "GB/s"] if warm else ["x clone", "GB/s"]
    head = "| format | " + " | ".join(f"{d} {c}" for d in dtypes for c in cols) + " |"
    lines = [head, "|" + " --- |" * (1 + len(cols) * len(dtypes))]
    for name in dict.fromkeys(r.format for r in rows):
        cells = []
        for d in dtypes:
            r = next(r for r in rows if r.format == name and r.dtype == d)
            mark = "" if r.bits_equal_cpu_reference in (None, True) else " (bits differ!)"
            ao = f" (torchao {r.torchao_ratio_to_clone:.2f}x)" if r.torchao_ratio_to_clone else ""
            cells += [f"{r.ratio_to_clone:.2f}x{ao}{mark}"]
            cells += [f"{r.ratio_to_warm_copy:.2f}x"] if warm else []
            cells += [f"{r.gb_per_s:.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first = {d: next(r for r in rows if r.dtype == d) for d in dtypes}
    clones = ", ".join(f"{d} {r.clone_ms:.3f} ms" for d, r in first.items())
    copies = ", ".join(f"{d} {r.copy_ms:.3f} ms" for d, r in first.items()) if warm else "-"
    return "\n".join(lines) + f"\n\nclone (first row): {clones}; warm copy: {copies}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=8192, help="the tensor is size x size (default 8192)")
    p.add_argument("--formats", nargs="+", default=list_formats(), choices=list_formats(), metavar="FORMAT")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--check", action="store_true", help="compare each result with the CPU reference path")
    p.add_argument("--torchao", action="store_true", help="time torchao's cast + dequantize beside it")
    p.add_argument("--json", help="also write the rows here (JSON lines)")
    p.add_argument("--goal", type=float, help="fail unless every format's time is within GOAL x clone")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = measure(args.size, device, args.formats, args.dtypes, check=args.check, torchao=args.torchao)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"fake_quantize, {args.size}x{args.size}, {name}, time / clone of the same tensor and GB/s read+written")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(asdict(r)) + "\n" for r in rows)
    ok = all(r.bits_equal_cpu_reference in (None, True) for r in rows)
    if args.goal is not None:
        over = [f"{r.format} {r.dtype} {r.ratio_to_clone:.2f}x" for r in rows if r.ratio_to_clone > args.goal]
        print(f"goal <= {args.goal:g}x clone: " + (f"NOT met ({', '.join(over)})" if over else "met by every row"))
        ok = ok and not over
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
