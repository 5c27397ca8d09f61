"""Thread policy is the caller's (the model and processor leave torch's thread count alone): a helper to set it."""

from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int):
    """
    Run the block on `count` torch intra-op threads, then restore the previous count. E.g. a clip's Whisper features
    (a few ms) on one thread: on more, the calling thread's idle torch workers keep spinning afterwards and take the
    cores from a generation running in another thread. Not for blocks that run concurrently in several threads: each
    would restore the count the others set.
    """
    if count < 1:
        raise ValueError(f"torch_threads needs at least one thread, got {count}.")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
