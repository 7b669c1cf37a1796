"""Steps ask commitments only while a check can run (coordinator/inference/checks.py can_check),
and the hidden-state finite check is exact on every float format (swarm/compression/wire.py)."""

from types import SimpleNamespace

import pytest
import torch

from coordinator.inference.checks import Checks
from swarm.compression.wire import all_finite

pytestmark = pytest.mark.timeout(30)


class _Engine:
    def __init__(self, models: dict) -> None:
        self.models = models

    def get(self, name: str):
        if name not in self.models:
            raise KeyError(name)
        return self.models[name]


def _replica(model: str, state: str = "ready"):
    return SimpleNamespace(model=model, state=state)


def test_a_model_without_another_ready_chain_cannot_be_checked():
    a, b = _replica("m"), _replica("m", state="repairing")
    checks = Checks(_Engine({"m": SimpleNamespace(replicas=[a, b])}))
    assert not checks.can_check(a)  # the other chain is not ready: every check would be void
    b.state = "ready"
    assert checks.can_check(a) and checks.can_check(b)
    one = _Engine({"m": SimpleNamespace(replicas=[a])})
    assert not Checks(one, referee_tokens_per_s=0).can_check(a)  # one replica, and no referee budget
    assert Checks(one, referee_tokens_per_s=1.0).can_check(a)  # one replica: the referee replays its windows
    assert not Checks(_Engine({})).can_check(a)  # unserved meanwhile


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, 1024, 1 << 17])  # the numpy path and the torch path
def test_finite_check_finds_every_nan_and_inf(dtype, numel):
    x = torch.randn(numel).to(dtype)
    assert all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in (0, numel // 2, numel - 1):
            y = x.clone()
            y[where] = bad
            assert not all_finite(y), (bad, where)
    assert all_finite(torch.full((numel,), torch.finfo(dtype).max, dtype=dtype))  # large but finite
    assert all_finite(-torch.full((numel,), torch.finfo(dtype).tiny, dtype=dtype))  # negative, tiny


def test_a_check_against_a_chain_retired_since_is_void_not_refereed():
    """A window's steps share one replay: once a check found the checking chain wrong (it is
    retired), the window's later checks against it are void, not one recomputation each."""
    import threading

    from swarm.inference.verify import ChainResult, StageCommit

    released = []
    serving = SimpleNamespace(index=0, state="ready", release=lambda s, t: released.append(t))
    checker = SimpleNamespace(index=1, state="failing")
    m = SimpleNamespace(replicas=[serving, checker], num_checks_void=0)
    engine = _Engine({"m": m})
    engine._lock = threading.Lock()
    checks = Checks(engine)
    checks.referee = None  # a recomputation would fail loudly
    s = SimpleNamespace(replica=serving, handed_off_from=None)  # not a disaggregated prefill's step
    chain = lambda i, out: ChainResult(replica=i, token=1, stages=(  # noqa: E731
        StageCommit(node_id="n", first_layer=0, last_layer_excl=2, output=out),))
    ticket = object()
    assert checks._judge(m, serving, s, ticket, (1, 2), 1, chain(0, (1.0,) * 32), chain(1, (9.0,) * 32)) == []
    assert released == [ticket] and m.num_checks_void == 1
