"""Building blocks that plugins put into models: routed norms, FiLM, module surgery, splits, BN folding."""

from .film import FiLM
from .fold import check_folded, folded, folded_if_exact
from .norm import (NormAct, RoutedNorm, as_norm_act, batch_norms, bn_affine, copy_bn, eval_bn, iter_norms,
                   map_norms, replace_module)
from .split import Split, split_model, split_points

__all__ = [
    "FiLM", "NormAct", "RoutedNorm", "Split", "as_norm_act", "batch_norms", "bn_affine", "check_folded", "copy_bn",
    "eval_bn", "folded", "folded_if_exact", "iter_norms", "map_norms", "replace_module", "split_model", "split_points",
]
