"""The benchmark table as a picture: speed against each row's baseline and
extra peak memory, one bar per row, targets marked.

``write_plot(rows, path, title)`` is called by ``benchmarks.harness.report`` with the
rows it also writes to ``latest.json``; to redraw from a saved run::

    python -m benchmarks.harness.plot benchmarks/results/latest.json [out.png]

matplotlib is optional (it is in the ``bench`` extra): without it the
benchmark still writes its table and says why there is no picture.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

COLORS = {True: "#2e7d32", False: "#c62828", None: "#90a4ae"}  # met, not met, reference


def _label(row: dict[str, Any]) -> str:
    base = row.get("baseline") or "-"
    vs = "no baseline" if base == "-" else f"vs {base}"
    return f"{row['backend']}: {row['operation']}\n{vs} · {row['nbytes'] / (1 << 30):.2f} GiB"


def write_plot(rows: list[dict[str, Any]], path: Path, title: str) -> tuple[bool, str]:
    """Draw ``rows`` into a PNG at ``path``. Returns (written, message); never
    raises for a missing matplotlib or a drawing problem, which must not
    cost a finished benchmark its table."""
    try:
        import matplotlib
    except ImportError:
        return False, ("plot skipped: matplotlib is not installed "
                       "(pip install matplotlib, or pip install -e '.[bench]')")
    try:
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt

        _draw(plt, rows, path, title)
    except Exception as e:  # noqa: BLE001 - a picture is never worth the table
        return False, f"plot skipped: {type(e).__name__}: {e}"
    return True, f"wrote {path}"


def _draw(plt: Any, rows: list[dict[str, Any]], path: Path, title: str) -> None:
    # The crc32c row's ratio means something else (a share of the save); the scaling
    # curves have a picture of their own.
    rows = [r for r in rows if r.get("ratio_meaning", "").startswith("baseline time / time")
            and not r.get("curve")]
    if not rows:
        raise ValueError("no rows to plot")
    n = len(rows)
    fig, (ax_speed, ax_mem) = plt.subplots(
        1, 2, figsize=(14, 1.2 + 0.42 * n), sharey=True,
        gridspec_kw={"width_ratios": [3, 2]})
    ys = list(range(n))[::-1]  # first row on top, as in the table
    for y, r in zip(ys, rows):
        color = COLORS[r.get("meets_target")]
        if r.get("ratio") is not None:
            ax_speed.barh(y, r["ratio"], color=color, height=0.7)
            ax_speed.text(r["ratio"], y, f" {r['ratio']:.2f}", va="center", fontsize=8)
        elif r.get("seconds") is None and r.get("error"):
            ax_speed.text(0.02, y, "error", va="center", fontsize=8, color=COLORS[False])
        elif r.get("seconds") is not None:
            ax_speed.text(0.02, y, f"{r['seconds']:.2f} s (no baseline)", va="center", fontsize=8,
                          color="#455a64")
        if r.get("target") is not None:
            ax_speed.plot([r["target"]] * 2, [y - 0.42, y + 0.42], color="black", lw=1.5)
        if r.get("extra_rss") is not None:
            # A row whose target is on speed alone (the manager's async stall)
            # shows its memory as a reference, not as met or missed.
            mem_color = color if r.get("rss_target") is not None else COLORS[None]
            ax_mem.barh(y, r["extra_rss"], color=mem_color, height=0.7)
            ax_mem.text(max(r["extra_rss"], 0), y, f" {r['extra_rss']:+.2f}x", va="center", fontsize=8)
        if r.get("rss_target") is not None:
            ax_mem.plot([r["rss_target"]] * 2, [y - 0.42, y + 0.42], color="black", lw=1.5)
    ax_speed.set_yticks(ys)
    ax_speed.set_yticklabels([_label(r) for r in rows], fontsize=8)
    ax_speed.axvline(1.0, color="#607d8b", lw=0.8, ls="--")
    ax_speed.set_xlabel("baseline seconds / seconds\n(higher is faster; black tick = target)")
    ax_mem.axvline(0.0, color="#607d8b", lw=0.8)
    ax_mem.set_xlabel("extra peak RSS / state bytes\n(lower is better; black tick = target)")
    for ax in (ax_speed, ax_mem):
        ax.grid(axis="x", color="#eceff1")
        ax.set_axisbelow(True)
        ax.set_xlim(left=min(0, ax.get_xlim()[0]), right=ax.get_xlim()[1] * 1.12)
    # Separate the backends with a thin line.
    for i in range(1, n):
        if rows[i]["backend"] != rows[i - 1]["backend"]:
            for ax in (ax_speed, ax_mem):
                ax.axhline(ys[i] + 0.5, color="#b0bec5", lw=0.6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in (True, False, None)]
    fig.legend(handles, ["meets target", "misses target", "reference (no target)"],
               loc="upper right", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_scaling_plot(rows: list[dict[str, Any]], path: Path, title: str) -> tuple[bool, str]:
    """The scaling curves (rows with a ``curve``) into a PNG at ``path``: seconds per GiB and
    extra peak RSS against the state's size, on the local disk and on S3, and seconds against
    the tensor count at a fixed size. Same contract as ``write_plot``."""
    try:
        import matplotlib
    except ImportError:
        return False, "scaling plot skipped: matplotlib is not installed"
    try:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        _draw_scaling(plt, [r for r in rows if r.get("curve")], path, title)
    except Exception as e:  # noqa: BLE001
        return False, f"scaling plot skipped: {type(e).__name__}: {e}"
    return True, f"wrote {path}"


def _curves(rows: list[dict[str, Any]], axis: str, prefix: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("axis") == axis and r["curve"].startswith(prefix) and r.get("seconds"):
            out.setdefault(r["curve"].split(": ", 1)[1], []).append(r)
    return {k: sorted(v, key=lambda r: r["x"]) for k, v in out.items()}


def _draw_scaling(plt: Any, rows: list[dict[str, Any]], path: Path, title: str) -> None:
    if not rows:
        raise ValueError("no scaling rows to plot")
    panels = [("size", "local save", "local disk: save"), ("size", "local load", "local disk: load"),
              ("size", "s3 save", "S3 (moto): save"), ("size", "s3 load", "S3 (moto): load"),
              ("tensors", "local save", "local disk: save, 256 MiB split into n tensors"),
              ("tensors", "local load", "local disk: load, 256 MiB split into n tensors")]
    fig, axes = plt.subplots(4, 2, figsize=(13, 17))
    names = sorted({r["curve"].split(": ", 1)[1] for r in rows})
    cmap = plt.get_cmap("tab10")
    color = {name: ("black" if name == "ckptstore" else cmap(i % 10)) for i, name in enumerate(names)}

    def style(name: str) -> dict[str, Any]:
        raw = name in ("dd conv=fsync", "cat")
        return {"color": color[name], "lw": 2.6 if name == "ckptstore" else 1.4,
                "ls": ":" if raw else "-", "marker": "o", "ms": 4}

    for ax, (axis, prefix, heading) in zip(axes.flat, panels):
        curves = _curves(rows, axis, prefix)
        for name, rs in curves.items():
            xs = [r["x"] / (1 << 20) if axis == "size" else r["x"] for r in rs]
            ys = [r["seconds"] * (1 << 30) / r["nbytes"] for r in rs] if axis == "size" else [r["seconds"] for r in rs]
            ax.plot(xs, ys, label=name, **style(name))
        ax.set_xscale("log", base=2 if axis == "size" else 10)
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel("state size (MiB)" if axis == "size" else "tensors")
        ax.set_ylabel("seconds per GiB (lower is better)" if axis == "size" else "seconds (lower is better)")
        ax.grid(color="#eceff1")
        if curves:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    for ax, prefix, heading in ((axes[3][0], "local", "local disk: extra peak RSS"),
                                (axes[3][1], "s3", "S3 (moto): extra peak RSS")):
        for what, ls in (("save", "-"), ("load", "--")):
            for name, rs in _curves(rows, "size", f"{prefix} {what}").items():
                pts = [(r["x"] / (1 << 20), r["extra_rss"]) for r in rs if r.get("extra_rss") is not None]
                if pts:
                    ax.plot(*zip(*pts), label=f"{name} ({what})", color=color[name], ls=ls, marker="o", ms=3,
                            lw=2.6 if name == "ckptstore" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(heading, fontsize=10)
        ax.set_xlabel("state size (MiB)")
        ax.set_ylabel("extra peak RSS / state bytes")
        ax.grid(color="#eceff1")
        ax.legend(fontsize=6)
    fig.suptitle(title, x=0.01, ha="left", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m benchmarks.harness.plot RESULT.json [OUT.png]", file=sys.stderr)
        return 2
    src = Path(argv[1])
    out = Path(argv[2]) if len(argv) > 2 else src.with_suffix(".png")
    data = json.loads(src.read_text())
    machine = data.get("machine", {})
    title = (f"ckptstore benchmark · {str(machine.get('date', ''))[:10]} · "
             f"{machine.get('cpu_count', '?')} CPUs · best of {data.get('config', {}).get('repeat', '?')}")
    ok, msg = write_plot(data["rows"], out, title)
    print(msg, file=sys.stderr)
    if any(r.get("curve") for r in data["rows"]):
        done, msg = write_scaling_plot(data["rows"], out.with_name("scaling.png"),
                                       title.replace("benchmark", "scaling"))
        print(msg, file=sys.stderr)
        ok = ok and done
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
