"""The conformance suite: each case is written once against the interface and runs on both backends.

``linux`` is the live /dev/kvm; ``model`` is the software KVM with the profile captured from this machine
(``pvm-6.18``). On this machine both must give exactly the expected results.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmscope.api import System
from kvmscope.model import open_model

PROFILE = "pvm-6.18"


@pytest.fixture(params=["linux", "model"])
def kvm(request: pytest.FixtureRequest) -> Iterator[System]:
    if request.param == "linux":
        yield request.getfixturevalue("live")
        return
    system = open_model(profile=PROFILE)
    yield system
    system.close()
