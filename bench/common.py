"""Shared benchmark helpers: interleaved timing, saved-activation bytes, result files."""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ground import cli
from ground.runfolder import write_json  # bench.gpu_check imports it from here

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, callable], reps: int, warmup: int, device: str) -> dict[str, float]:
    """Median seconds per call. Candidates run round-robin inside one loop, so a slow phase of a noisy
    machine hits all of them alike and the ratios stay meaningful; the order rotates every repetition,
    so no candidate always runs right after the same neighbour (allocator and cache state)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for rep in range(reps):
        k = rep % len(items)
        for name, fn in items[k:] + items[:k]:
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward during fn(): the activation memory a method
    adds, measured the same way on any device (storage shared between saved tensors counted once)."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_cuda_bytes(fn, device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def base_parser(doc: str, reps: int, warmup: int) -> argparse.ArgumentParser:
    """The flags every bench takes: device, autocast dtype, methods, repetitions."""
    p = cli.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="autocast dtype (bf16 on GPU)")
    p.add_argument("--methods", nargs="*", help="subset of methods (default: all registered)")
    p.add_argument("--reps", type=int, default=reps, help="timed repetitions per candidate (median reported)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed repetitions first")
    p.add_argument("--out", type=Path, help="result JSON (default bench/results/<bench>-<device>-<dtype>[...].json)")
    return p


def write_results(args, bench: str, tag: str, argv, summary: dict, rows: list) -> Path:
    """bench/results/<bench>-<device>-<dtype><tag>.json (or --out), with the command and the machine."""
    out = args.out or RESULTS / f"{bench}-{args.device.split(':')[0]}-{args.dtype}{tag}.json"
    write_json(out, {"command": f"python bench/{bench}.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "machine": machine(), "summary": summary, "rows": rows}, parents=True)
    print(f"\nwrote {out}")
    return out
