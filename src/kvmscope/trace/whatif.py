"""What each kernel would do with each recording: the matrix of ``kvmscope check --corpus DIR``.

Each recording is replayed faithfully on the model under each kernel (a version or a proposed-rule TOML file) and
host profile; a cell is OK when nothing is refused, else the first refused operation with its rule, and counts the
capabilities the VMM asked for that this kernel answers otherwise (the VMM would take another path there).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import backends, inputs
from ..check import StepResult, outcome_text, replay_iter
from ..errors import InvalidValueError, KvmscopeError, ScenarioError
from ..scenario import stream


@dataclass
class Cell:
    recording: str
    kernel: str
    profile: str
    ok: bool
    text: str  # "OK", or the first refusal
    step: int | None = None
    line: int | None = None
    rule: str | None = None  # the refusing rule's commit and title, when the model knows it
    as_recorded: bool | None = None  # did the step do what the live kernel did when it was recorded?
    differs: int = 0  # queries the VMM made that this kernel answers otherwise (up to the cell's step)
    capabilities: list[str] = field(default_factory=list)  # their names: capabilities, and lists (KVM_GET_...)
    beyond: int = 0  # steps where this kernel took what the recording's kernel refused (up to the cell's step)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def first_refusal(path: Path, kernel: str, profile: str | None) -> Cell:
    """Replay ``path`` on the model until its first refused (or failed) step."""
    opened = stream(path)
    # --profile first, else the scenario's own profile: (a recording of another host names it), else this project's
    system, _ = backends.choose("model", kernel=kernel, profile=profile or opened.header.profile)
    prof = str(system.host_info().get("profile"))
    results = replay_iter(opened.steps, system, None, opened.header.faithful)
    asked: dict[str, None] = {}
    beyond = 0
    try:
        with system:
            for r in results:
                if r.outcome in ("refused", "error") and not r.not_listed:  # an MSR the VMM would not send here
                    return replace(_refused(path, kernel, prof, r), differs=len(asked), capabilities=list(asked),
                                   beyond=beyond)
                if r.outcome == "differs":
                    asked[r.asked_capability] = None
                beyond += r.beyond_recording
    finally:
        for generator in (results, opened.steps):  # stop both now: the VM and the file are released at once
            getattr(generator, "close", lambda: None)()
    return Cell(path.stem, kernel, prof, True, "OK", differs=len(asked), capabilities=list(asked), beyond=beyond)


def _refused(path: Path, kernel: str, profile: str, r: StepResult) -> Cell:
    f = r.refusal
    if f is not None:
        what = f"{'read' if r.kind == 'get_msrs' or 'GET' in r.summary else 'refused'} {f.name} (0x{f.index:x})"
        what += "" if "read" in what else f" = 0x{f.new:x}"
    else:
        what = outcome_text(r)
    rule = f.rule if f is not None else None
    cite = None if rule is None else (rule.commit if rule.commit != "-" else rule.key)
    where = ", ".join(w for w in ("" if r.vcpu is None else f"vCPU {r.vcpu}", r.label.split(" pid")[0]) if w)
    return Cell(path.stem, kernel, profile, False, f"{what} at step {r.number}" + (f" ({where})" if where else ""),
                r.number, r.line, cite, r.met)


def _scenario_file(path: Path) -> bool:
    """Whether ``path`` is one to replay: a JSON file with neither a top-level "scenario" nor a "steps" key is another
    kind of file kept next to the scenarios (a host profile they name, a CPU template) and is left out; a broken one
    is not, so that its error is shown."""
    if path.suffix != ".json":
        return True
    try:
        data = inputs.json_data(inputs.read_text(path, ScenarioError, "a scenario"), inputs.shown(path), ScenarioError)
    except KvmscopeError:
        return True
    return not isinstance(data, dict) or "scenario" in data or "steps" in data  # one that lacks a line is shown


def matrix(directory: Path, kernels: list[str], profiles: list[str | None]) -> list[Cell]:
    """Every recording or scenario (``*.yaml``, ``*.yml``, ``*.json`` in ``directory``) x kernel x profile."""
    recordings = sorted(p for pattern in ("*.yaml", "*.yml", "*.json") for p in directory.glob(pattern)
                        if _scenario_file(p))
    if not recordings:
        raise InvalidValueError(f"{directory}: no recordings or scenarios (*.yaml, *.yml, *.json) there")
    return [first_refusal(r, k, p) for r in recordings for p in profiles for k in kernels]
