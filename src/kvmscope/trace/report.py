"""What ``kvmscope trace`` prints (the CLI's printing for the recorder, next to kvmscope.render)."""

from __future__ import annotations

from rich.markup import escape

from ..check import split_asked
from ..render import console, json_document
from .recorder import Result as TraceResult
from .recorder import shortened
from .whatif import Cell


def trace_result(result: TraceResult, out: str, as_json: bool) -> None:
    """What a trace recorded, where, and what KVM refused."""
    if as_json:
        json_document("trace", {"recording": out, **result.to_json()})
        return
    con = console()
    s = result.summary
    command = shortened(" ".join(result.argv))
    con.print(f"recorded [bold]{escape(command)}[/] to {escape(out)}: {s.steps} steps from {s.calls} KVM ioctls "
              f"in {result.seconds:.2f} s; the command {escape(result.ended)}", highlight=False)
    if s.vcpus:
        runs = ", ".join(f"vCPU {v}: {s.runs.get(v, 0)}" for v in s.vcpus)
        ids = f"id{'s' if len(s.vcpus) > 1 else ''} {', '.join(map(str, s.vcpus))}"
        con.print(f"vCPUs created: {len(s.vcpus)} ({ids}); KVM_RUN calls: {runs}", highlight=False)
    if s.other_vms:
        con.print(f"{s.other_vms} more VM(s) created: their ioctls are kept as traced steps, not replayed",
                  highlight=False)
    if s.failed:
        con.print("other failed calls (kept as traced steps): "
                  + ", ".join(f"{k} x{n}" for k, n in s.failed.items()), highlight=False)
    for line in s.refused:
        con.print(f"[red]refused[/]: {line}", highlight=False)
    for line in result.errors:
        con.print(f"[yellow]warning[/]: {line}", highlight=False)
    con.print(f"next: kvmscope check {out}   (why each refusal; --compare V1,V2 for other kernels)",
              highlight=False)


def corpus_matrix(cells: list[Cell], kernels: list[str], as_json: bool) -> None:
    """Recordings x kernels (x profiles): OK, or the first refusal."""
    if as_json:
        json_document("check --corpus", {"kernels": kernels, "cells": [c.to_json() for c in cells]})
        return
    from rich.table import Table

    con = console()
    profiles = list(dict.fromkeys(c.profile for c in cells))
    for profile in profiles:
        table = Table(title=f"recordings x kernels (model, profile {profile})", show_lines=True)
        table.add_column("recording")
        for k in kernels:
            table.add_column(k.rsplit("/", 1)[-1].removesuffix(".toml") + (" (proposed)" if k.endswith(".toml") else ""))
        for rec in dict.fromkeys(c.recording for c in cells if c.profile == profile):  # a scenario may name its own
            row = {c.kernel: c for c in cells if c.recording == rec and c.profile == profile}
            table.add_row(rec, *(_cell(row[k]) for k in kernels))
        con.print(table)


def _cell(c: Cell) -> str:
    caps, lists = split_asked(c.capabilities)
    differs = f"; {len(caps)} capabilities answer otherwise" if len(caps) > 1 else \
        f"; {caps[0]} answers otherwise" if caps else ""
    differs += f"; {len(lists)} lists differ from the recording" if len(lists) > 1 else \
        f"; {lists[0]} differs from the recording" if lists else ""
    differs += f"; {c.beyond} step(s) further than recorded" if c.beyond else ""
    if c.ok:
        return f"[green]OK[/]{differs}"
    rule = f"; rule {c.rule}" if c.rule else ""
    same = "; as recorded" if c.as_recorded else ""
    return f"[red]{c.text}[/]{rule}{same}{differs}"
