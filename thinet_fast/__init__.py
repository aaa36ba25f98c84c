"""thinet_fast: fast and exact ThiNet filter pruning."""
from .ops.dispatch import backends, BackendUnavailable
from .ops.greedy import greedy_remove, greedy_remove_ref, greedy_keep_ls, greedy_keep_ls_ref

__version__ = "0.1.0"
