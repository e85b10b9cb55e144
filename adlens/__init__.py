"""adlens: look inside an Algorithm Distillation model and compress its history.

The model-agnostic part of the toolkit. It never imports the project's `model/` or `env/` packages,
so it sits beside any AD codebase (which usually has packages of those names):

    capture       forward hooks that record per-head attention (nn.MultiheadAttention and
                  nn.TransformerEncoderLayer included)
    compression   history compression strategies and the merge plans they produce
    capture_file  the versioned attention capture format
    metrics       pure attention metrics; plots: figures from them
    adapter       a user's own model through a small adapter file: capture, and compression by a
                  forward pre-hook on the module that receives the token history
    config, errors, io   CLI plumbing, the user-error type, atomic outputs
    device        the one reading of `--device` (cuda without CUDA is a user error)

Shape glossary used in comments throughout:
    B  batch (parallel environments or training windows)   L  layers     H  heads
    T  context length in tokens                             D  width      Dh head width (D / H)
    Tq, Tk  query and key lengths; attention is (B, H, Tq, Tk), rows sum to 1
"""
