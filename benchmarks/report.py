"""Assemble benchmarks/RESULTS.md and its plot from the JSON the benchmarks wrote.

python -m benchmarks.report --results benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def printed_section(path: Path, title: str) -> list[str]:
    """A script's printed output as a section, or nothing when it was not run."""
    if not path.is_file():
        return []
    return ["", f"## {title}", "", "```", path.read_text().strip(), "```"]


def plot_http(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for (server, workload), group in _group(rows).items():
        ax.plot(
            [r["concurrency"] for r in group],
            [r["requests_per_s"] for r in group],
            marker="o",
            label=f"{server}: {workload}",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests/s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _group(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["server"], row["workload"]), []).append(row)
    return groups


def render(results: Path) -> str:
    lines = ["# Benchmarks", "", "Made by `make bench`; every figure below was measured in that one run.", ""]
    infer = json.loads((results / "infer.json").read_text())
    lines += [f"`{infer['machine']}`", "", "## 1. Model (`python -m benchmarks.infer`)", ""]
    lines += [
        f"Forward FLOPs per image: {infer['flops_per_image'] / 1e6:.1f} M. Measured matmul peak: "
        f"fp32 {infer['peak_gflops']['fp32']:.0f} GFLOP/s, "
        + (
            f"bf16 {infer['peak_gflops']['bf16']:.0f} GFLOP/s."
            if infer["peak_gflops"].get("bf16")
            else "bf16 not timed (this CPU only emulates it)."
        ),
        "",
        "| mode | batch | median ms | p95 ms | images/s | vs fp32 batch 1 | of matmul peak |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in infer["rows"]:
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['latency_ms_median']:.2f} | {r['latency_ms_p95']:.2f} | "
            f"{r['images_per_s']:.0f} | {r['ratio_to_fp32_batch1']:.2f}× | {r['fraction_of_peak']:.0%} |"
        )
    pre = json.loads((results / "preprocess.json").read_text())
    lines += ["", "## 2. Preprocessing (`python -m benchmarks.preprocess`), median µs per image", ""]
    names = list(pre["microseconds"])
    lines += ["| stage | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for stage in pre["microseconds"][names[0]]:
        lines.append(f"| {stage} | " + " | ".join(f"{pre['microseconds'][n][stage]:.0f}" for n in names) + " |")
    lines += printed_section(results / "precision.txt", "bf16 vs fp32 on val (`python -m benchmarks.precision`)")
    lines += printed_section(
        results / "int8.txt", "The int8 path vs fp32 and bf16 (`python -m benchmarks.int8`; docs/int8.md)"
    )
    lines += printed_section(
        results / "tta.txt", "Test-time augmentation on val (`python -m benchmarks.tta`; served with `FER_TTA`)"
    )
    lines += printed_section(
        results / "chunk.txt",
        "Ten-crop's views in one pass or in chunks (`python -m benchmarks.chunk`; its machine line may differ)",
    )
    http = json.loads((results / "http.json").read_text())
    lines += [
        "",
        "## 3–4. The service end to end vs the naive baseline (`python -m benchmarks.http`)",
        "",
        f"Servers run torch {http.get('server_torch', 'as above')}; the service serves in "
        f"{http.get('service_precision', 'bf16 where the CPU has it')} (`FER_PRECISION=auto`). "
        f"Cold start, process start to `/ready`: {http['cold_start_s']:.2f} s. Load generator: "
        "`benchmarks/loadgen.py` in its own process on the same 2 cores, multipart uploads.",
        "",
        "| server | workload | clients | requests/s | p50 ms | p95 ms | p99 ms | server CPU (cores) | peak RSS MB | errors | mean batch |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in http["rows"]:
        mean_batch = f"{r['mean_batch']:.1f}" if r.get("mean_batch") else "–"
        lines.append(
            f"| {r['server']} | {r['workload']} | {r['concurrency']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['server_cpu_cores']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['errors']} | {mean_batch} |"
        )
    plot_http(http["rows"], results.parent / "http.png")
    lines += ["", "![requests/s by concurrency](http.png)", ""]
    index = {(r["server"], r["workload"], r["concurrency"]): r for r in http["rows"]}
    lines += [
        "### Ratios, service / naive",
        "",
        "Answers with status 200 per second: a 503 (load shed, with `Retry-After`) is not an answer. This load "
        "generator retries at once instead of waiting `Retry-After`, so where the service sheds, its clients' "
        "retries take CPU from the photos it admits.",
        "",
        "| workload | clients | 200s/s ratio | p50 ratio (lower is better) | service 503s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for (server, workload, concurrency), r in index.items():
        naive = index.get(("naive", workload, concurrency))
        if server == "service" and naive:
            lines.append(
                f"| {workload} | {concurrency} | {answered_per_s(r) / answered_per_s(naive):.2f}× | "
                f"{r['p50_ms'] / naive['p50_ms']:.2f} | {r.get('statuses', {}).get('503', 0)} |"
            )
    at_32 = index.get(("service", "predict 48x48", 32))
    if at_32 and at_32.get("mean_batch"):
        if http.get("service_precision") == "int8" and (results / "int8.json").is_file():
            int8_rates = json.loads((results / "int8.json").read_text())["faces_per_s"]["int8"]
            rows = [{"mode": "int8", "batch": int(b), "images_per_s": v} for b, v in int8_rates.items()]
            served_mode = "int8, benchmarks.int8"
            model_rate = model_images_per_s(rows, "int8", at_32["mean_batch"])
        else:
            served_mode = served_mode_of(infer["rows"])
            model_rate = model_images_per_s(infer["rows"], served_mode, at_32["mean_batch"])
        cpu_ms = at_32["server_cpu_cores"] / at_32["requests_per_s"] * 1000
        lines += [
            "",
            f"At 32 clients the service formed batches of {at_32['mean_batch']:.1f} on average; the model alone "
            f"({served_mode}, interpolated between the measured batch sizes) runs {model_rate:.0f} images/s there, "
            f"so the service's {at_32['requests_per_s']:.0f} requests/s are **{at_32['requests_per_s'] / model_rate:.0%}** "
            f"of the model's rate. The server used {cpu_ms:.2f} ms of CPU per request.",
        ]
    if (results / "http-cpu-wheel.json").is_file():
        lines += render_cpu_wheel(json.loads((results / "http-cpu-wheel.json").read_text()))
    if (results / "tune.json").is_file():
        lines += render_tune(json.loads((results / "tune.json").read_text()))
    if (results / "profile.json").is_file():
        lines += render_profile(json.loads((results / "profile.json").read_text()))
    if (results / "photos.json").is_file():
        lines += render_photos(json.loads((results / "photos.json").read_text()))
    if (results / "threads.json").is_file():
        lines += render_threads(json.loads((results / "threads.json").read_text()))
    lines += printed_section(results / "video.txt", "9. Video (`python -m benchmarks.video`; docs/video.md)")
    if (results / "scale.json").is_file():
        lines += render_scale(json.loads((results / "scale.json").read_text()))
    return "\n".join(lines) + "\n"


# What the service runs: bf16 where the CPU has it, fp32 where benchmarks.infer found it only emulated.
SERVED_MODES = ("bf16_channels_last_fused", "fp32_channels_last_fused")


def served_mode_of(rows: list[dict[str, Any]]) -> str:
    """The benchmarked mode the service runs on the machine that measured `rows`."""
    measured = {r["mode"] for r in rows}
    return next(mode for mode in SERVED_MODES if mode in measured)


def answered_per_s(row: dict[str, Any]) -> float:
    """Responses with status 200 per second (all responses for a row without its status counts)."""
    statuses = row.get("statuses")
    if not statuses:
        return float(row["requests_per_s"])
    return float(row["requests_per_s"]) * statuses.get("200", 0) / max(1, sum(statuses.values()))


def model_images_per_s(rows: list[dict[str, Any]], mode: str, batch: float) -> float:
    """The model's in-process images/s at `batch`, linear between the measured batch sizes."""
    points = sorted((r["batch"], r["images_per_s"]) for r in rows if r["mode"] == mode)
    if batch <= points[0][0]:
        return float(points[0][1])
    for (b0, v0), (b1, v1) in zip(points, points[1:], strict=False):
        if b0 <= batch <= b1:
            return float(v0 + (v1 - v0) * (batch - b0) / (b1 - b0))
    return float(points[-1][1])


def render_cpu_wheel(http: dict[str, Any]) -> list[str]:
    """The same HTTP run with the servers on the CPU-only torch wheel that real users install."""
    lines = [
        "",
        f"### The same run on the CPU-only wheel (torch {http['server_torch']})",
        "",
        "Real deployments install the CPU wheel (the Dockerfile's build arg); the CUDA build above maps "
        "its CUDA libraries into every process. This run is made with "
        "`python -m benchmarks.http --server-python VENV/bin/python --json benchmarks/results/http-cpu-wheel.json` "
        f"(not part of `make bench`). Cold start {http['cold_start_s']:.2f} s.",
        "",
        "| server | workload | clients | requests/s | p50 ms | p99 ms | peak RSS MB | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in http["rows"]:
        lines.append(
            f"| {r['server']} | {r['workload']} | {r['concurrency']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['peak_rss_mb']:.0f} | {r['errors']} |"
        )
    return lines


def render_tune(tune: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## 5. Batching defaults (`python -m benchmarks.tune`), predict 48x48",
        "",
        "The first row is the defaults; each other row changes one setting.",
        "",
        "| settings | clients | requests/s | p50 ms | p99 ms | server CPU ms/request | mean batch | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in tune["rows"]:
        lines.append(load_row(r, [r["server"], r["concurrency"]], f"{r.get('mean_batch') or 0:.1f}"))
    return lines


def load_row(r: dict[str, Any], first: list[object], *extra: str) -> str:
    """One load point as a table row: the given first cells, then rate, latency, CPU, extras, errors."""
    cpu_ms = r["server_cpu_cores"] / r["requests_per_s"] * 1000 if r["requests_per_s"] else float("nan")
    cells = [
        *map(str, first),
        f"{r['requests_per_s']:.1f}",
        f"{r['p50_ms']:.1f}",
        f"{r['p99_ms']:.1f}",
        f"{cpu_ms:.2f}",
    ]
    return "| " + " | ".join([*cells, *extra, str(r["errors"])]) + " |"


def render_profile(profile: dict[str, Any]) -> list[str]:
    load = profile["load"]
    lines = [
        "",
        f"## 6. Where the CPU goes (`python -m benchmarks.profile`), predict 48x48 at {load['concurrency']} clients",
        "",
        f"{load['requests']} requests at {load['requests_per_s']:.0f} requests/s; the server used "
        f"{profile['cpu_ms_per_request']:.2f} ms of CPU per request. Exact CPU per thread from /proc, each Python "
        "thread's share split by py-spy samples (innermost frame that names a part).",
        "",
        "| part | CPU ms/request | share |",
        "| --- | ---: | ---: |",
    ]
    for row in profile["parts"]:
        lines.append(f"| {row['part']} | {row['cpu_ms_per_request']:.3f} | {row['share']:.0%} |")
    return lines


def service_table(rows: list[dict[str, Any]]) -> list[str]:
    """Requests/s and latency per server, workload and concurrency."""
    lines = [
        "| server | workload | clients | requests/s | p50 ms | p99 ms | server CPU ms/request | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    return lines + [load_row(r, [r["server"], r["workload"], r["concurrency"]]) for r in rows]


def render_photos(photos: dict[str, Any]) -> list[str]:
    """The photo path on kdef-dev and the service on photos, both detectors side by side."""
    lines = ["", "## 7. Real photos (`python -m benchmarks.photos`)", "", f"`{photos['machine']}`", ""]
    lines += ["kdef-dev through the engine, one client:", "", *photos["kdef_table"], ""]
    lines += ["The service end to end, each detector in its own server:", "", *service_table(photos["service"])]
    return lines


def render_threads(threads: dict[str, Any]) -> list[str]:
    """The thread combinations at 8 clients."""
    lines = ["", "## 8. Threads (`python -m benchmarks.threads`), 8 clients", "", f"`{threads['machine']}`", ""]
    return lines + service_table(threads["rows"])


def render_scale(scale: dict[str, Any]) -> list[str]:
    """Local fer predict against Ray with 1 and 2 workers, in one run."""
    lines = ["", "## 10. Batch inference on Ray (`python -m benchmarks.scale`; docs/scale.md)", ""]
    lines += [f"`{scale['machine']}`", "", "fp32 everywhere; start-up is the same command on one image.", ""]
    lines += [
        "| set | engine | images | wall s | start-up s | steady images/s | end-to-end images/s | peak RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in scale["runs"]:
        steady = "–" if r["steady_images_per_s"] is None else f"{r['steady_images_per_s']:.0f}"
        lines.append(
            f"| {r['set']} | {r['engine']} | {r['images']} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | {steady} "
            f"| {r['end_to_end_images_per_s']:.0f} | {r['peak_rss_mb']} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--results", type=Path, default=Path("benchmarks/results"), help="folder of the benchmarks' JSON"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS.md"), help="the report to write")
    args = parser.parse_args()
    args.out.write_text(render(args.results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
