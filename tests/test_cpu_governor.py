"""The thread governor (`spqr_run.cpu.governor`): decode steps go serial when that is measured faster, back
to the pool when the pool is, probes stay rare on a steady machine, and the mode never changes a result."""

from __future__ import annotations

import pytest
import torch

from spqr_run.cpu import lib as native
from spqr_run.cpu.governor import ThreadGovernor


def run(gov: ThreadGovernor, steps: int, cost: dict[bool, float], key: int = 1) -> list[bool]:
    """`steps` decode steps where a serial step takes cost[True] s and a parallel one cost[False]."""
    modes = []
    for _ in range(steps):
        serial = gov.choose(key)
        gov.observe(key, serial, cost[serial])
        modes.append(serial)
    return modes


def test_switches_to_serial_when_the_pool_is_slower_and_back_when_it_is_faster() -> None:
    gov = ThreadGovernor()
    busy = {False: 12e-3, True: 9e-3}  # another process holds a core: the pool loses
    modes = run(gov, 64, busy)
    assert modes[0] is False  # starts on the pool
    assert gov.serial(1) and gov.switches == 1
    assert sum(not m for m in modes[-16:]) <= 2  # settled: serial but for at most one 2-step probe
    idle = {False: 5e-3, True: 9e-3}  # the other process ended
    modes = run(gov, 64, idle)
    assert not gov.serial(1) and gov.switches == 2
    assert sum(modes[-16:]) <= 2


def test_a_steady_machine_pays_for_few_probes() -> None:
    gov = ThreadGovernor()
    modes = run(gov, 2000, {False: 5e-3, True: 9e-3})
    assert gov.switches == 0
    probes = sum(modes)
    # 2 serial steps per probe; intervals 16, 32, ... 256 after the first 8 steps
    assert 2 <= probes <= 2 * 12 and probes / len(modes) < 0.015


def test_a_probe_within_the_margin_does_not_switch() -> None:
    gov = ThreadGovernor(margin=0.05)
    run(gov, 500, {False: 10e-3, True: 9.7e-3})  # 3% faster: noise, not a reason to switch
    assert gov.switches == 0 and not gov.serial(1)


def test_keys_are_governed_apart() -> None:
    gov = ThreadGovernor()
    run(gov, 64, {False: 12e-3, True: 9e-3}, key=1)  # one row: serial wins
    run(gov, 64, {False: 20e-3, True: 30e-3}, key=4)  # four rows: the pool wins
    assert gov.serial(1) and not gov.serial(4)


def test_steps_the_governor_did_not_ask_for_are_ignored() -> None:
    gov = ThreadGovernor()
    for _ in range(40):
        gov.observe(1, True, 1e-3)  # serial steps reported while parallel is current and no probe runs
    assert not gov.serial(1) and gov.switches == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="probe_steps"):
        ThreadGovernor(probe_steps=16, min_interval=16)


@pytest.mark.skipif(native.load() is None, reason="native CPU kernels unavailable")
def test_serial_and_pool_steps_give_identical_logits(tiny_spqr_file) -> None:
    from spqr_run.loading import build_decoder, open_model

    lib = native.load()
    model = build_decoder(open_model(tiny_spqr_file(3)))
    assert model.native is not None
    before = lib.spqr_cpu_threads()
    lib.spqr_cpu_set_threads(2, -1)
    try:
        outs = {}
        for serial in (False, True):
            model.setup_caches(1, 32)
            steps = [model(torch.tensor([[3, 5, 7, 11]]))]  # prefill: never serial
            model.native.governor.choose = lambda key, s=serial: s  # type: ignore[method-assign]
            for pos in range(4, 12):
                steps.append(model(torch.tensor([[pos + 20]]), torch.tensor([[pos]])))
            outs[serial] = torch.cat([s.reshape(-1) for s in steps])
        assert torch.equal(outs[False], outs[True]) and not outs[True].isnan().any()
    finally:
        lib.spqr_cpu_set_threads(before, -1)
