"""pipeline.worker_deaths: a batch whose worker dies is bisected across restarts; a poison input is one error."""

from __future__ import annotations

import pytest

from annotators import WorkerLost
from pipeline.worker_deaths import call_bisecting


def _call(poison=(), die_first: int = 0, log=None):
    deaths = {"left": die_first}

    def call(batch):
        if log is not None:
            log.append(list(batch))
        if deaths["left"] > 0 or any(x in poison for x in batch):
            deaths["left"] -= 1
            raise WorkerLost("actor died (simulated)")
        return [x * 10 for x in batch]

    return call


def test_a_poison_input_is_bisected_to_one_error_and_the_rest_is_annotated():
    poisoned = []
    outputs = call_bisecting(list(range(8)), _call(poison={5}), lambda item, exc: poisoned.append(item))
    assert outputs == [0, 10, 20, 30, 40, None, 60, 70] and poisoned == [5]


def test_a_death_that_does_not_repeat_loses_nothing():
    log, poisoned = [], []
    outputs = call_bisecting([1, 2, 3], _call(die_first=1, log=log), lambda item, exc: poisoned.append(item))
    assert outputs == [10, 20, 30] and poisoned == [] and log[0] == [1, 2, 3]


def test_a_worker_dying_on_everything_is_systematic_not_poison():
    poisoned = []
    with pytest.raises(WorkerLost):
        call_bisecting(list(range(6)), _call(die_first=10**6), lambda item, exc: poisoned.append(item))
    assert poisoned == []
    with pytest.raises(WorkerLost):  # a batch of one that dies twice: nothing went through, no verdict
        call_bisecting([7], _call(poison={7}), lambda item, exc: poisoned.append(item))
    assert poisoned == []
