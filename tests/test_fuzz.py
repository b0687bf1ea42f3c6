"""Fuzzing the parsers, the CLI and the API arguments: only kvmscope's own errors may escape, never a traceback.

A short budget by default; ``KVMSCOPE_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py`` runs longer.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmscope.api import MsrBatch
from kvmscope.cli import main
from kvmscope.errors import InvalidValueError, MsrLookupError, ProfileError, ScenarioError
from kvmscope.kernel.profile import load, read
from kvmscope.scenario import STEP_KINDS, parse

BUDGET = settings(max_examples=int(os.environ.get("KVMSCOPE_FUZZ_EXAMPLES", "300")), deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=12),
                    st.sampled_from(["0xce", "PLATFORM_INFO", "HltExit", "EINVAL", "supported", "stored", "0x7.0"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8) | st.sampled_from(
                                                                 [*STEP_KINDS, "vcpu", "msrs", "expect", "from",
                                                                  "edits", "leaf", "register", "name", "returned"]),
                                                                 inner, max_size=4)), max_leaves=12)
steps = st.lists(st.dictionaries(st.sampled_from([*STEP_KINDS, "expect", "label", "bogus"]), json_values,
                                 min_size=1, max_size=2), max_size=5)
scenarios = st.fixed_dictionaries({"scenario": st.sampled_from([1, 1, 1, 2, "1"]), "steps": steps},
                                  optional={"name": json_values, "kernel": json_values, "profile": json_values})


@BUDGET
@given(st.text(max_size=300))
def test_scenario_parser_on_random_text(text: str) -> None:
    with contextlib.suppress(ScenarioError):
        parse(text, "fuzz.yaml")


@BUDGET
@given(scenarios)
def test_scenario_parser_on_random_structures(doc: dict[str, Any]) -> None:
    for where in ("fuzz.yaml", "fuzz.json"):
        with contextlib.suppress(ScenarioError):
            parse(json.dumps(doc), where)


VALID_PROFILE = load("pvm-6.18").to_json()


@BUDGET
@given(st.data())
def test_profile_loader_on_mutated_profiles(data: st.DataObject) -> None:
    doc = json.loads(json.dumps(VALID_PROFILE))
    for _ in range(data.draw(st.integers(1, 3))):
        target: Any = doc
        path = []
        while isinstance(target, (dict, list)) and target and data.draw(st.booleans()):
            key = data.draw(st.sampled_from(sorted(target) if isinstance(target, dict) else range(len(target))))
            path.append(key)
            if not isinstance(target[key], (dict, list)):
                break
            target = target[key]
        if isinstance(target, dict) and target:
            target[data.draw(st.sampled_from(sorted(target)))] = data.draw(json_values)
        elif isinstance(target, list) and target:
            target[data.draw(st.integers(0, len(target) - 1))] = data.draw(json_values)
    with contextlib.suppress(ProfileError):
        read(doc, "fuzz.json")


@BUDGET
@given(st.lists(st.one_of(st.integers(-(2**70), 2**70), st.text(max_size=10), st.none(), st.floats(),
                          st.tuples(json_values, json_values), st.tuples(st.integers(), st.integers(), st.integers())),
                max_size=4))
def test_msr_batch_arguments(entries: list[Any]) -> None:
    with contextlib.suppress(InvalidValueError, MsrLookupError):
        MsrBatch(entries)


@settings(max_examples=int(os.environ.get("KVMSCOPE_FUZZ_EXAMPLES", "300")) // 3, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(scenarios, st.lists(st.sampled_from(["--kernel", "6.3", "6.99", "x", "--profile", "intel-spr", "nope",
                                            "--compare", "6.3,6.18", "6.3", "--json", "--backend", "model"]),
                           max_size=4))
def test_cli_check_never_shows_a_traceback(doc: dict[str, Any], args: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "s.yaml"
        f.write_text(json.dumps(doc))
        result = CliRunner().invoke(main, ["check", str(f), *args])
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


@BUDGET
@given(st.text(max_size=20), st.one_of(st.none(), st.text(max_size=24)))
def test_cli_decode_never_shows_a_traceback(msr: str, value: str | None) -> None:
    result = CliRunner().invoke(main, ["decode", msr, *([value] if value is not None else [])])
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
