"""Evaluation with full attention: sliding-window perplexity, passkey retrieval, and plots."""

from .loading import load_for_eval
from .passkey import passkey_accuracy, passkey_grid, passkey_lengths
from .perplexity import document_token_ids, perplexity_at_lengths, sliding_window_nll
from .plots import plot_passkey, plot_passkey_heatmap, plot_perplexity

__all__ = [
    "document_token_ids",
    "load_for_eval",
    "passkey_accuracy",
    "passkey_grid",
    "passkey_lengths",
    "perplexity_at_lengths",
    "plot_passkey",
    "plot_passkey_heatmap",
    "plot_perplexity",
    "sliding_window_nll",
]
