"""Shared test setup."""

import torch

# Small tensors on a busy 2-core machine run far faster on one intra-op thread; nothing in the suite
# measures speed.
torch.set_num_threads(1)
