"""The project's AD network (rotary positions, fused attention), its key/value cache, the in-context
rollout engines, checkpoints, training data and the recorded rollout behind a capture file.

Shape glossary: see `adlens/__init__.py`; keys/values (B, H, Tk, Dh), per-position scores (B, Tk).
"""

from model.ad import ADConfig, ADTransformer, Tokens

__all__ = ["ADConfig", "ADTransformer", "Tokens"]
