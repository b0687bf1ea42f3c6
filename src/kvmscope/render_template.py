"""What the ``kvmscope template``, ``baseline`` and ``fingerprint`` commands print, as plain text or JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from .render import json_document

if TYPE_CHECKING:
    from .fleet import Baseline, Difference
    from .template import Template
    from .template_apply import ApplyReport, BitDiff, Dump, VcpuOutcome


def _name(name: str) -> str:
    """A profile's name as user text on one line (escaped, shortened), or what stands for an empty one."""
    from .inputs import shown

    return shown(name) if name else "(a profile with no name)"


def _json(data: Any) -> None:
    """A Firecracker template, as Firecracker's JSON (a file format: no report envelope)."""
    click.echo(json.dumps(data, indent=2))


def _bits(d: BitDiff) -> str:
    if d.got is None:
        if d.kind == "missing":
            return "not in the state"
        return (f"wanted 0x{d.wanted:x}; the write was refused and the MSR cannot be read" if d.kind == "refused"
                else "could not be read back")
    shown = ", ".join(map(str, d.bits[:16])) + (" ..." if len(d.bits) > 16 else "")
    return f"wanted 0x{d.wanted:x}, holds 0x{d.got:x}" + (f"; bits {shown}" if d.bits else "")


def template_summary(t: Template, as_json: bool) -> None:
    """A template read back: its canonical Firecracker JSON, or what it touches."""
    if as_json:
        _json(t.to_json())
        return
    click.echo(f"{t.path}: {len(t.kvm_capabilities)} capability check(s), {len(t.cpuid_modifiers)} CPUID leaf "
               f"modifier(s), {len(t.msr_modifiers)} MSR modifier(s)")
    from .uapi import CAPABILITY_NAMES

    for c in t.kvm_capabilities:
        name = f" ({CAPABILITY_NAMES[c.number]})" if c.number in CAPABILITY_NAMES else ""
        click.echo(f"  capability {'remove' if c.removed else 'require'} {c.number}{name}")
    for m in t.cpuid_modifiers:
        for r in m.modifiers:
            click.echo(f"  CPUID 0x{m.leaf:x}.{m.subleaf} {r.register:<3} {r.bitmap.text()}  (flags {m.flags})")
    from .msrs import name_of

    for mm in t.msr_modifiers:
        click.echo(f"  MSR {name_of(mm.addr)} (0x{mm.addr:x})\n      {mm.bitmap.text()}")
    for o in t.overrides():
        click.echo(f"  note: {o}: Firecracker applies both in turn, so the later one's bits win")


def apply_report(r: ApplyReport) -> None:
    click.echo(f"template {r.template} on {r.description}")
    if r.cannot_move:
        click.echo(f"  cannot move: {r.cannot_move}")
    for f in r.failures:
        click.echo(f"  Firecracker stops: {f}")
    for n in r.notes:
        click.echo(f"  note: {n}")
    for v in r.source_vcpus or ():  # a restore: only what did not hold on the source (the snapshot carries it)
        if v.diffs:
            _vcpu_outcome(v, "on the source, ")
    for v in r.vcpus:
        _vcpu_outcome(v)
    click.echo(("OK: " if r.ok else "NOT TAKEN: ") + r.summary())


def _vcpu_outcome(v: VcpuOutcome, where: str = "") -> None:
    state = "CPUID set" if v.cpuid_set else "CPUID REFUSED"
    click.echo(f"  {where}vCPU {v.vcpu}: {state}; KVM_SET_MSRS wrote {v.msrs_written} of {v.msrs_total}")
    for d in v.diffs:
        click.echo(f"    {d.kind.upper():<10} {d.where}: {_bits(d)}")
        if d.rule:
            click.echo(f"               rule: {d.rule}")


def apply_reports(reports: dict[str, ApplyReport], as_json: bool, command: str = "template apply") -> None:
    """One report per backend (or kernel, with --compare), then a line per kernel. JSON: the report, or with several
    the kernels in order and a report for each (the shape of ``check --compare``)."""
    if as_json:
        if len(reports) > 1:
            json_document(f"{command} --compare", {"kernels": list(reports),
                                                   "reports": {k: r.to_json() for k, r in reports.items()}})
        else:
            json_document(command, next(iter(reports.values())).to_json())
        return
    for r in reports.values():
        apply_report(r)
    if len(reports) > 1:
        click.echo("by kernel:")
        for k, r in reports.items():
            click.echo(f"  {k:<6} {r.summary()}")


def verify_report(source: str, diffs: Sequence[BitDiff], as_json: bool) -> None:
    if as_json:
        json_document("template verify", {"state": source, "ok": not diffs, "diffs": [d.to_json() for d in diffs]})
        return
    for d in diffs:
        click.echo(f"  MISMATCH {d.where}: {_bits(d)}")
    click.echo(f"OK: every fixed bit of the template holds in {source}" if not diffs else
               f"MISMATCH: {len(diffs)} register(s) or MSR(s) of {source} differ from the template")


def dump_report(d: Dump, path: str | None) -> None:
    """The dump as JSON on standard output, or a note of where it went (and what was left out)."""
    from .msrs import name_of

    if path is None:
        click.echo(d.template.dumps(), nl=False)
    else:
        click.echo(f"wrote {path}: {len(d.template.cpuid_modifiers)} CPUID leaves, {len(d.template.msr_modifiers)} MSRs")
    if d.left_out:
        click.echo("left out (not dumpable): " + ", ".join(name_of(i) for i in d.left_out), err=True)
    if d.unreadable:
        click.echo("left out (KVM_GET_MSRS refused): " + ", ".join(name_of(i) for i in d.unreadable), err=True)


def baseline_report(b: Baseline, names: Sequence[str], path: str | None, as_json: bool,
                    rulesets: dict[str, str] | None = None) -> None:
    """``rulesets``: each host's name -> the kernel ruleset it was judged under."""
    if as_json:
        json_document("baseline", {"hosts": list(names), "rulesets": rulesets or {}, **b.to_json()})
        return
    if path is None:
        click.echo(b.template.dumps(), nl=False)
    else:
        click.echo(f"wrote {path}: the baseline of {', '.join(map(_name, names))}")
    forced: dict[tuple[str, tuple[str, ...], int], list[int]] = {}
    for f in b.forced:
        forced.setdefault((f.where, tuple(f.hosts), f.value), []).append(f.bit)
    for (where, hosts, value), bits in forced.items():
        click.echo(f"  forced to {value} by {', '.join(map(_name, hosts))}: {where} bits {', '.join(map(str, bits))}",
                   err=path is None)
    for why in b.left_out:
        click.echo(f"  left out: {why}", err=path is None)
    for note in b.notes:
        click.echo(f"  note: {note}", err=path is None)


def fingerprint_report(a: str, b: str, diffs: Sequence[Difference], as_json: bool, notes: Sequence[str] = ()) -> None:
    """``notes``: the model's warnings (a kernel newer than the rules), printed on stderr by the caller as text."""
    if as_json:
        json_document("fingerprint compare", {"a": a, "b": b, "same": not diffs,
                                              "differences": [d.to_json() for d in diffs], "notes": list(notes)})
        return
    click.echo(f"{_name(a)} vs {_name(b)}")
    for d in diffs:
        detail = f" ({d.detail})" if d.detail else ""
        click.echo(f"  {d.what:<11} {d.where}: {d.a} vs {d.b}{detail}")
    click.echo("same: nothing that matters for migration differs" if not diffs else
               f"{len(diffs)} difference(s) that matter for migration")
