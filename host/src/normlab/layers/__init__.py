"""Building blocks that plugins put into models: routed norms, FiLM, module surgery, splits, BN folding,
convolutions that skip padding-only taps."""

from .film import FiLM
from .fold import check_folded, folded, folded_if_exact
from .norm import (NormAct, RoutedNorm, as_norm_act, batch_norms, bn_affine, copy_bn, eval_bn, iter_norms,
                   map_norms, replace_module)
from .split import Split, split_model, split_points
from .taps import live_taps, padding_taps_kept, skip_padding_taps

__all__ = [
    "FiLM", "NormAct", "RoutedNorm", "Split", "as_norm_act", "batch_norms", "bn_affine", "check_folded", "copy_bn",
    "eval_bn", "folded", "folded_if_exact", "iter_norms", "live_taps", "map_norms", "padding_taps_kept",
    "replace_module", "skip_padding_taps", "split_model", "split_points",
]
