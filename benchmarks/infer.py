"""Model throughput: images/s and latency at batch 1, 8, 32, 128 in fp32, fp32 channels_last, bf16
channels_last, and bf16 channels_last on the fused network the service runs (BatchNorm folded
in, `models.network.fuse_for_inference`), against the machine's measured matmul peak.

On a CPU without AVX-512 BF16 or AMX, oneDNN only emulates bf16 (far slower than fp32, and the
service runs fp32 there), so the bf16 rows are replaced by fp32 channels_last on the fused
network, the path served on such a CPU.

    python -m benchmarks.infer --json benchmarks/results/infer.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.machine import machine_line, write_results
from models.checkpoint import load_checkpoint
from models.network import fuse_for_inference
from models.precision import cpu_supports_bf16

BATCH_SIZES = (1, 8, 32, 128)
MODES = ("fp32", "fp32_channels_last", "bf16_channels_last", "bf16_channels_last_fused")
MODES_WITHOUT_BF16 = ("fp32", "fp32_channels_last", "fp32_channels_last_fused")


def flops_per_image(network: torch.nn.Module) -> float:
    """Forward FLOPs of one 48×48 image (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        network(torch.zeros(1, 1, 48, 48))
    return float(counter.get_total_flops())


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 8) -> float:
    """Measured GFLOP/s of a large square matmul: the machine's practical ceiling."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def time_forward(network: torch.nn.Module, mode: str, batch_size: int, seconds: float) -> dict[str, float]:
    inputs = torch.randn(batch_size, 1, 48, 48)
    if mode != "fp32":
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16"))
    latencies = []
    with torch.inference_mode(), autocast:
        for _ in range(3):
            network(inputs)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(latencies) < 5:
            started = time.perf_counter()
            network(inputs)
            latencies.append(time.perf_counter() - started)
    median = statistics.median(latencies)
    return {
        "batch": batch_size,
        "latency_ms_median": median * 1000,
        "latency_ms_p95": sorted(latencies)[int(0.95 * (len(latencies) - 1))] * 1000,
        "images_per_s": batch_size / median,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("models/checkpoint.pth"), help="checkpoint to time")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per point")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = all cores")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    network = load_checkpoint(args.checkpoint).network.eval()
    flops = flops_per_image(network)
    bf16 = cpu_supports_bf16()
    peak_fp32 = matmul_peak_gflops(torch.float32)
    peak_bf16 = matmul_peak_gflops(torch.bfloat16) if bf16 else None
    print(
        f"forward FLOPs per image: {flops / 1e6:.1f} M; matmul peak fp32 {peak_fp32:.0f} GFLOP/s, "
        + (f"bf16 {peak_bf16:.0f} GFLOP/s" if peak_bf16 else "bf16 not timed (no AVX-512 BF16 or AMX: emulated)")
    )
    rows = []
    for mode in MODES if bf16 else MODES_WITHOUT_BF16:
        model = fuse_for_inference(network) if mode.endswith("_fused") else network
        if mode != "fp32":
            model = model.to(memory_format=torch.channels_last)
        for batch_size in BATCH_SIZES:
            row = {"mode": mode, **time_forward(model, mode, batch_size, args.seconds)}
            peak = peak_bf16 if mode.startswith("bf16") and peak_bf16 else peak_fp32
            row["fraction_of_peak"] = row["images_per_s"] * flops / (peak * 1e9)
            rows.append(row)
    base = next(r["images_per_s"] for r in rows if r["mode"] == "fp32" and r["batch"] == 1)
    print(f"{'mode':<20} {'batch':>5} {'median ms':>10} {'p95 ms':>8} {'img/s':>8} {'vs fp32 b1':>10} {'of peak':>8}")
    for row in rows:
        row["ratio_to_fp32_batch1"] = row["images_per_s"] / base
        print(
            f"{row['mode']:<20} {row['batch']:>5} {row['latency_ms_median']:>10.2f} {row['latency_ms_p95']:>8.2f} "
            f"{row['images_per_s']:>8.0f} {row['ratio_to_fp32_batch1']:>9.2f}x {row['fraction_of_peak']:>7.1%}"
        )
    write_results(args.json, flops_per_image=flops, peak_gflops={"fp32": peak_fp32, "bf16": peak_bf16}, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
