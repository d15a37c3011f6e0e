"""mmgen.tasks.common.evaluating: eval mode for a block, then the mode the module had."""

from __future__ import annotations

import pytest
from torch import nn

from mmgen.tasks.common import evaluating


def test_training_module_is_evaluated_then_restored_even_on_error() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train()
    with evaluating(net):
        assert not net.training and not net[1].training
    assert net.training and net[1].training
    with pytest.raises(RuntimeError), evaluating(net):
        raise RuntimeError("boom")
    assert net.training and net[1].training


def test_a_module_in_eval_mode_is_left_alone() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).eval()
    calls = []
    net.train = lambda mode=True: calls.append(mode)  # eval() calls train(False): switching would show here
    with evaluating(net):
        assert not net.training
    assert calls == [] and not net.training
