"""torch_threads: the caller's thread count around a block, restored however the block ends."""

import pytest
import torch

from modeling_echox.torch_threads import torch_threads


def test_sets_the_count_inside_and_restores_it_after_an_error():
    previous = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == previous


def test_refuses_fewer_than_one_thread():
    previous = torch.get_num_threads()
    with pytest.raises(ValueError, match="at least one thread"):
        with torch_threads(0):
            pass
    assert torch.get_num_threads() == previous
