"""The run's results: the table (text and markdown), the notes under it, the machine, and
the files a run writes (``<out>/latest.json``, ``latest.md``, ``latest.png``, ``scaling.png``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.harness.context import GIB, REPO, Context
from benchmarks.harness.registry import scenarios
from benchmarks.harness.series import Row
from benchmarks.harness.servers import fs_type

COLUMNS = ["backend", "operation", "GiB", "seconds", "GB/s", "baseline", "baseline s",
           "ratio", "target", "extra peak RSS", "meets target"]


LEFT = {0, 1, 5, 10}  # text columns; numbers are right-aligned


def _cells(row: Row) -> list[str]:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    size = f"{row.nbytes / GIB:.2f}"
    target = "-" if row.target is None else f"{'<=' if row.target_is_max else '>='}{row.target:.2f}"
    if row.error and row.seconds is None:
        meets = "error"
        return [row.backend, row.operation, size, "error", "-", row.baseline,
                num(row.baseline_seconds, ".3f"), "-", target, "-", meets]
    rss = "-" if row.extra_rss is None else f"{row.extra_rss:+.3f}x"
    if row.rss_target is not None:
        rss += f" (<={row.rss_target:.2f})"
    meets = {None: "-", True: "yes", False: "NO"}[row.meets_target]
    if row.target is not None and row.meets_target is None:
        meets = "error" if row.error else "-"  # e.g. the baseline failed: nothing to compare
    return [row.backend, row.operation, size, num(row.seconds, ".3f"), num(row.gb_per_s, ".2f"),
            row.baseline, num(row.baseline_seconds, ".3f"), num(row.ratio, ".2f"),
            target, rss, meets]


def text_table(rows: list[Row]) -> str:
    cells = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    # Text left-aligned, numbers right-aligned, as a reader scans them.
    lines = []
    for k, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i in LEFT else v.rjust(w)
                               for i, (v, w) in enumerate(zip(c, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if i in LEFT else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def notes_for(rows: list[Row], ctx: Context, cold_note: str) -> list[str]:
    notes = [
        "ratio = baseline seconds / seconds (1.0 = as fast as the baseline), except the "
        "crc32c row, where it is checksum time / save time.",
        f"times are the best of {ctx.repeat}; extra peak RSS is the worst, as a fraction of "
        "the state's tensor bytes (save: peak - RSS before; load: peak - RSS before - state).",
        "loads include reading every byte of every tensor, so lazily mapped results are paid for.",
    ]
    if cold_note:
        notes.append(cold_note)
    backends = {r.backend for r in rows}
    known = {sc.key: sc for sc in scenarios()}
    remote = sorted(k for k in backends if k in known and known[k].remote)
    if remote:
        notes.append(
            f"{', '.join(remote)} rows use a {ctx.remote_state_bytes / GIB:.2f} GiB state "
            f"(--remote-size-gib), {_listed(tuple(k for k in gpt_scenarios(remote=False) if k in backends))} "
            f"{ctx.state_bytes / GIB:.2f} GiB.")
    # Each backend's own notes, in the table's order; one shared by several once.
    for b in scenarios():
        if b.key in backends:
            notes += [n for n in b.notes(ctx) if n not in notes]
    # One line per distinct error of a backend, naming the rows it hit.
    errors: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        if r.note:
            notes.append(f"{r.backend} {r.operation}: {r.note}")
        if r.error:
            errors.setdefault((r.backend, r.error), []).append(r.operation)
    for (backend, error), ops in errors.items():
        short = error if len(error) <= 400 else error[:400] + "..."
        notes.append(f"{backend} ERROR in {'; '.join(ops)}: {short}")
    return notes


def _listed(keys: tuple[str, ...]) -> str:
    """"a, b and c"."""
    return ", ".join(keys[:-1]) + f" and {keys[-1]}" if len(keys) > 1 else "".join(keys)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(workdir: Path) -> dict[str, Any]:
    """Enough to compare runs; deliberately no hostname or user names."""
    def git_like(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip() or "\n"
        except (OSError, subprocess.SubprocessError):
            return "\n"

    def git(*args: str) -> str:
        return git_like(["git", *args]).strip()

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "ckptstore", "numpy", "fsspec", "crc32c",
                                              "s3fs", "gcsfs", "boto3", "moto",
                                              "gcp-storage-emulator", "matplotlib")},
        "rclone": git_like(["rclone", "version"]).splitlines()[0] if shutil.which("rclone") else None,
        "workdir_fs": fs_type(str(workdir)),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
    }


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)



def gpt_scenarios(remote: bool) -> tuple[str, ...]:
    """The scenarios that measure the GPT state of --size (remote: of --remote-size)."""
    return tuple(s.key for s in scenarios() if s.remote == remote and s.nbytes is None)


def write_results(out: Path, rows: list[Row], ctx: Context, info: dict, config: dict, notes: list[str],
                  reproduce: str) -> dict:
    """``out``/latest.json (every sample, the machine), latest.md, latest.png and, with
    scaling rows, scaling.png; returns the JSON's content."""
    from benchmarks.harness.plot import write_plot, write_scaling_plot
    from benchmarks.state import gpt_config

    out.mkdir(parents=True, exist_ok=True)
    cfg, rcfg = gpt_config(ctx.size_bytes), gpt_config(ctx.remote_size_bytes)
    result = {
        "schema": 1,
        "machine": info,
        "config": config,
        "state": {"bytes": ctx.state_bytes, "gpt": cfg},
        "remote_state": {"bytes": ctx.remote_state_bytes, "gpt": rcfg},
        "rows": [asdict(r) for r in rows],
        "notes": notes,
        "wall_seconds": round(time.perf_counter() - ctx.started, 1),
    }
    write_atomic(out / "latest.json", json.dumps(result, indent=2) + "\n")
    remote = ""
    chosen = {r.backend for r in rows}
    if any(k in chosen for k in gpt_scenarios(remote=True)):
        remote = (f" · {'/'.join(gpt_scenarios(remote=True))} state {ctx.remote_state_bytes / GIB:.2f} GiB "
                  f"(GPT d={rcfg['d_model']}, {rcfg['n_layer']} layers, vocab {rcfg['vocab']})")
    title = (f"ckptstore benchmark{' (quick)' if ctx.quick else ''} · {info['date'][:10]} · "
             f"{info['cpu_count']} CPUs · best of {ctx.repeat}")
    plotted, plot_msg = write_plot(result["rows"], out / "latest.png", title)
    ctx.log(plot_msg)
    scaled = False
    if any(r.curve for r in rows):
        scaled, scale_msg = write_scaling_plot(result["rows"], out / "scaling.png", title.replace("benchmark", "scaling"))
        ctx.log(scale_msg)
    md = [
        f"# ckptstore benchmark: {'quick' if ctx.quick else 'latest'} run",
        "",
        f"{info['date']} · {info['cpu_count']} CPUs, {info['memory_bytes'] / GIB:.0f} GiB RAM · "
        f"{info['platform']} · Python {info['python']}, torch {info['versions']['torch']} · "
        f"workdir on {info['workdir_fs']} · state {ctx.state_bytes / GIB:.2f} GiB "
        f"(GPT d={cfg['d_model']}, {cfg['n_layer']} layers, vocab {cfg['vocab']}, AdamW){remote} · "
        f"best of {ctx.repeat} · {'cold' if ctx.cold else 'warm'} cache loads · "
        f"{result['wall_seconds']:.0f} s in all",
        "",
        markdown_table(rows),
        "",
        *[f"- {n}" for n in notes],
        "",
        *(["![ratios and extra memory](latest.png)", ""] if plotted else []),
        *(["![seconds per GiB and extra memory by size and tensor count](scaling.png)", ""] if scaled else []),
        f"Reproduce: `{reproduce}`",
        "",
    ]
    write_atomic(out / "latest.md", "\n".join(md))
    ctx.log(f"wrote {out / 'latest.json'}, {out / 'latest.md'}" + (f" and {out / 'latest.png'}" if plotted else ""))
    return result
