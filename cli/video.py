"""`fer video IN.mp4 --output timeline.csv`: an emotion timeline for every face in a video file.

Frames go through the same engine as the service's (`Engine.classify_video`): sampled at
`--fps`, scaled down, searched for faces, classified in batches, followed by the box-overlap
tracker and smoothed over `--smooth` seconds (models/tracking.py says how).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from cli.engine_options import add_engine_flags, cli_engine_config
from models.engine import Engine
from models.tracking import Track
from models.video import DEFAULT_FPS, DEFAULT_SMOOTH_S, Timeline

OUTPUT_FORMATS = ("csv", "jsonl")
# A local file may be longer than what the service takes in one upload (FER_MAX_VIDEO_SECONDS).
VIDEO_MAX_SECONDS = 3600.0


def add_video_parser(commands: Any, formatter: type[argparse.HelpFormatter]) -> None:
    """The `fer video` sub-command's flags."""
    video = commands.add_parser(
        "video", help="an emotion timeline for every face in a video", formatter_class=formatter
    )
    video.add_argument("path", type=Path, help="video file: MP4, MOV, WebM, MKV or AVI")
    video.add_argument(
        "--output", type=Path, required=True, help="timeline file: .csv or .jsonl (one row per face per frame)"
    )
    video.add_argument(
        "--fps",
        type=float,
        default=None,
        help=f"frames analysed per second of video (default: $FER_VIDEO_FPS or {DEFAULT_FPS:g})",
    )
    video.add_argument(
        "--smooth", type=float, default=None,
        help=f"seconds the smoothed probabilities remember (exponential average; 0: none; default: $FER_VIDEO_SMOOTH_S or {DEFAULT_SMOOTH_S:g})",
    )  # fmt: skip
    video.add_argument("--plot", type=Path, default=None, help="draw each track's smoothed probabilities here (.png)")
    video.add_argument(
        "--max-seconds", type=float, default=None,
        help=f"refuse videos longer than this (default: $FER_MAX_VIDEO_SECONDS or {VIDEO_MAX_SECONDS:g})",
    )  # fmt: skip
    add_engine_flags(video)
    video.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="progress bar with frames/s on stderr (default: when it is a terminal)",
    )  # fmt: skip


def video_command(args: argparse.Namespace) -> int:
    """Run `fer video`; returns the exit status. Raises `FerError` for a bad video."""
    suffix = args.output.suffix.lower().lstrip(".")
    if suffix not in OUTPUT_FORMATS:
        print(f"fer: --output must end in .csv or .jsonl, not {args.output.name!r}", file=sys.stderr)
        return 2
    given = (args.fps, args.smooth, args.max_seconds)
    if any(value is not None and value < low for value, low in zip(given, (0.1, 0.0, 1e-9), strict=True)):
        print("fer: --fps must be at least 0.1, --smooth 0 or more and --max-seconds above 0", file=sys.stderr)
        return 2
    if not args.path.exists():
        print(f"fer: {args.path}: no such file", file=sys.stderr)
        return 2
    if not args.path.is_file():  # a folder, a FIFO or a device: opening some of them would block
        print(
            f"fer: {args.path}: not a regular file (a folder, a FIFO or a device): name a video file", file=sys.stderr
        )
        return 2
    if not args.output.parent.is_dir():
        print(f"fer: {args.output.parent}: no such folder for --output", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fer: --plot needs matplotlib (pip install 'fer-service[train]')", file=sys.stderr)
            return 2
    config = cli_engine_config(
        args, {"max_video_seconds": VIDEO_MAX_SECONDS},
        video_fps=args.fps, max_video_seconds=args.max_seconds, video_smooth_s=args.smooth,
    )  # fmt: skip
    engine = Engine.load(config.checkpoint, config)
    try:
        timeline = asyncio.run(
            analyse(engine, args.path, progress=sys.stderr.isatty() if args.progress is None else args.progress)
        )
    finally:
        engine.close()
    with args.output.open("w", newline="") as out:
        write_timeline(timeline, out, suffix)
    if args.plot:
        plot_timeline(timeline, args.plot)
    sys.stderr.write(summary_text(timeline))
    return 0


async def analyse(engine: Engine, path: Path, *, progress: bool) -> Timeline:
    """The engine's timeline, with a progress bar (frames/s) while it runs when asked and tqdm is installed."""
    bar: Any = None
    if progress:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(unit="frame", file=sys.stderr)
    try:
        on_frame = (lambda frame, faces: bar.update(1)) if bar is not None else None
        return await engine.classify_video(path, on_frame=on_frame)
    finally:
        if bar is not None:
            bar.close()


def timeline_rows(timeline: Timeline) -> Iterator[dict[str, Any]]:
    """One row per face per analysed frame, in time order: time, frame, track, box, raw and smoothed probabilities."""
    points = sorted(
        ((point, track) for track in timeline.tracks for point in track.points),
        key=lambda item: (item[0].t, item[1].id),
    )
    classes = timeline.classes
    for point, track in points:
        yield {
            "t": round(point.t, 3),
            "frame": point.frame,
            "track": track.id,
            "box": point.box.as_list(),
            "label": classes[int(point.probabilities.argmax())],
            "probabilities": dict(zip(classes, point.probabilities.tolist(), strict=True)),
            "smoothed_label": classes[int(point.smoothed.argmax())],
            "smoothed": dict(zip(classes, point.smoothed.tolist(), strict=True)),
        }


def csv_header(classes: Sequence[str]) -> list[str]:
    """The CSV's columns."""
    return [
        "t", "frame", "track", "x", "y", "width", "height", "label", *classes, "smoothed_label",
        *(f"smoothed_{name}" for name in classes),
    ]  # fmt: skip


def write_timeline(timeline: Timeline, out: TextIO, output_format: str) -> None:
    """The rows as CSV (columns from `csv_header`) or JSON lines."""
    classes = timeline.classes
    if output_format == "jsonl":
        for row in timeline_rows(timeline):
            out.write(json.dumps(row) + "\n")
        return
    writer = csv.writer(out)
    writer.writerow(csv_header(classes))
    for row in timeline_rows(timeline):
        writer.writerow(
            [row["t"], row["frame"], row["track"], *row["box"], row["label"]]
            + [f"{row['probabilities'][name]:.4f}" for name in classes]
            + [row["smoothed_label"]]
            + [f"{row['smoothed'][name]:.4f}" for name in classes]
        )


def summary_text(timeline: Timeline) -> str:
    """What `fer video` prints at the end: the sampling, then each track's time in view and dominant emotion."""
    lines = [
        f"{timeline.frames_analysed} frames analysed at {timeline.fps:g}/s over {timeline.duration_s:.1f} s; "
        f"{len(timeline.tracks)} track(s)"
    ]
    for track, summary in zip(timeline.tracks, timeline.summaries, strict=True):
        top = sorted(summary.mean_probabilities.items(), key=lambda item: -item[1])[:3]
        means = ", ".join(f"{name} {p:.2f}" for name, p in top)
        lines.append(
            f"track {track.id}: {track.first_s:.1f}-{track.last_s:.1f} s ({summary.duration_s:.1f} s in view, "
            f"{summary.frames} frames): {summary.dominant} (mean {means})"
        )
    return "\n".join(lines) + "\n"


def plot_timeline(timeline: Timeline, path: Path) -> None:
    """One panel per track: its smoothed probabilities against time, the seven classes in fixed colours."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("fer: --plot needs matplotlib (pip install 'fer-service[train]')") from None
    tracks: Sequence[Track] = timeline.tracks
    panels = max(1, len(tracks))
    fig, axes = plt.subplots(panels, 1, figsize=(9, 2.2 * panels + 0.6), sharex=True, squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, track, summary in zip(axes[:, 0], tracks, timeline.summaries, strict=False):
        times = [point.t for point in track.points]
        for index, name in enumerate(timeline.classes):
            ax.plot(times, [point.smoothed[index] for point in track.points], color=colours(index), label=name, lw=1.6)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"track {track.id}")
        ax.set_title(
            f"track {track.id}: mostly {summary.dominant}, {track.first_s:.1f}-{track.last_s:.1f} s",
            fontsize=9, loc="left",
        )  # fmt: skip
        ax.grid(alpha=0.3)
    if not tracks:
        axes[0, 0].text(0.5, 0.5, "no face found", ha="center", va="center", transform=axes[0, 0].transAxes)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:  # one legend for every panel, above them
        fig.legend(handles, labels, ncol=7, fontsize=8, loc="upper center", frameon=False)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
