"""`fedslim bases`: the base checkpoints cached on this machine, listed or removed."""

from __future__ import annotations

import argparse
import time

from fedslim.base import CachedBase, cache_dir, cached_bases, clear_cached_bases


def add_bases_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bases = sub.add_parser(
        "bases",
        help="list or remove the cached base checkpoints",
        description="The pretrained bases cached on this machine ($FEDSLIM_CACHE/bases, ~/.cache/fedslim by "
        "default); a removed base is pretrained again when a run needs it.",
    )
    commands = bases.add_subparsers(dest="bases_command", required=True)
    commands.add_parser("list", help="each cached base: file, task, size, date, fingerprint (where recorded)")
    clear = commands.add_parser("clear", help="remove every cached base, or the named ones")
    clear.add_argument("names", nargs="*", metavar="NAME", help="a task's name or a checkpoint's file name")


def run_bases(args: argparse.Namespace) -> int:
    if args.bases_command == "list":
        print(bases_listing(cached_bases()))
        return 0
    removed = clear_cached_bases(args.names)
    for base in removed:
        print(f"removed {base.path.name} ({base.task}, {mib(base.size)}, {len(base.files)} file(s))")
    print(
        f"removed {len(removed)} cached base(s), {mib(sum(b.size for b in removed))}" if removed else "no cached base"
    )
    return 0


def mib(size: int) -> str:
    """A size in MiB, or in KiB below one MiB (a small base is not 0.0 MiB)."""
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def bases_listing(bases: list[CachedBase]) -> str:
    """The cache folder and one line per base, in plain columns (never cut, whatever the output)."""
    folder = cache_dir() / "bases"
    if not bases:
        return f"no cached base in {folder}"
    header = ("file", "task", "size", "modified (UTC)", "fingerprint")
    rows = [
        (
            base.path.name + ("" if base.complete else " (partial)"),
            base.task,
            mib(base.size),
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(base.modified)),
            base.fingerprint[:16] if base.fingerprint else "-",
        )
        for base in bases
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    total = mib(sum(base.size for base in bases))
    title = f"{len(bases)} cached base(s) in {folder}, {total}"
    return "\n".join([title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(), *lines])
