"""The AD network, its key/value cache, attention capture and history compression.

Shape glossary used in comments throughout:
    B  batch (parallel environments or training windows)   L  layers     H  heads
    T  context length in tokens (one token per transition)  D  width      Dh head width (D / H)
    Tq, Tk  query and key lengths; attention is (B, H, Tq, Tk), rows sum to 1
    keys/values (B, H, Tk, Dh); per-position scores (B, Tk)
"""

from model.ad import ADConfig, ADTransformer, Tokens

__all__ = ["ADConfig", "ADTransformer", "Tokens"]
