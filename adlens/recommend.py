"""A compression recommendation that was measured: candidates from the attention, the verdict from timings.

    >>> cands = candidates(summary, attention_rec)             # a few (strategy, ratio, ...) to try
    >>> rows = [measure(runner, ...) for c in cands]           # compression_template.measure, paired timing
    >>> best = choose(rows)                                    # fastest within 5% loss that is faster at all

The attention-only rules (recency -> fixed_window, sparse -> topk, otherwise pooling) give a starting
point; the candidates add the budgets that hold 80% and 90% of the attention with the strategies the
pattern suggests, and the cheapest eviction (sinks + recent window). Only what was measured to be
faster than no compression, within the loss bound, is recommended; otherwise the answer is "none".
"""

from __future__ import annotations

import math

import numpy as np

from adlens.io import stamp

MAX_LOSS = 0.05  # a candidate may lose at most this fraction of the uncompressed return


def _ratio(tokens: float, context: int) -> float:
    """A token budget as a compression_ratio, rounded up to 0.01, within (0, 1]."""
    return float(min(1.0, max(0.01, math.ceil(100 * tokens / context - 1e-9) / 100)))


def candidates(summary: dict, rec: dict, n_sink: int = 4, max_candidates: int = 4) -> list[dict]:
    """Configurations worth measuring, the attention-only pick first; each shortens the context.

    summary : metrics of the capture (adlens.metrics.summarize); rec: its attention-only recommendation
    Returns dicts with strategy, compression_ratio, compression_interval, keep_recent (and n_sink)."""
    T = int(summary["max_context"])
    interval = int(rec["compression_interval"])
    recent = int(summary["window_for_coverage"])
    out = [{k: rec[k] for k in ("strategy", "compression_ratio", "compression_interval", "keep_recent", "n_sink") if k in rec}]
    r90 = _ratio(summary["fraction_for_90_long"] * T, T)
    r80 = _ratio(summary["fraction_for_80"] * T, T)
    for ratio in (r90, r80):
        budget = max(1, round(ratio * T))
        out.append({"strategy": rec["strategy"], "compression_ratio": ratio, "compression_interval": interval,
                    "keep_recent": max(1, min(int(rec["keep_recent"]), budget - 1)), **({"n_sink": n_sink} if rec["strategy"] == "sink_window" else {})})  # fmt: skip
    window = n_sink + int(summary["window_with_sinks_for_coverage"])
    r_sink = _ratio(window, T)
    out.append({"strategy": "sink_window", "compression_ratio": r_sink, "compression_interval": interval,
                "keep_recent": max(1, round(r_sink * T) - n_sink), "n_sink": n_sink})  # fmt: skip
    if rec["strategy"] != "fixed_window":
        out.append({"strategy": "fixed_window", "compression_ratio": r90, "compression_interval": interval,
                    "keep_recent": max(1, min(recent, round(r90 * T) - 1))})  # fmt: skip
    seen, unique = set(), []
    for c in out:
        key = (c["strategy"], c["compression_ratio"])
        if c["compression_ratio"] < 1.0 and key not in seen and round(c["compression_ratio"] * T) > c.get("n_sink", 0):
            seen.add(key)
            unique.append(c)
    return unique[:max_candidates]


def choose(rows: list[dict], max_loss: float = MAX_LOSS) -> dict | None:
    """The fastest measured row that shortens the context, runs faster than no compression and loses at
    most `max_loss` of the return (point estimate); None when no row does."""
    ok = [r for r in rows if r.get("shortens_context", True) and r["speedup"] > 1.0 and r["performance_loss"] <= max_loss]
    return max(ok, key=lambda r: r["speedup"]) if ok else None


def fit_step_cost(context_len, step_s) -> tuple[float, float]:
    """Least-squares fit step time = a + b * context length over a rollout's steps -> (a s, b s per token)."""
    n = np.asarray(context_len, dtype=np.float64)
    t = np.asarray(step_s, dtype=np.float64)
    if len(n) < 2 or np.ptp(n) == 0:
        return float(t.mean()) if len(t) else 0.0, 0.0
    b, a = np.polyfit(n, t, 1)
    return float(a), float(max(b, 0.0))


def break_even_context(a: float, b: float, overhead_s: float, ratio: float) -> float | None:
    """Context length (tokens) above which a compression that keeps `ratio` of it saves more per step
    (b * (1 - ratio) * n) than it costs (overhead_s per step); None if it never does, or if the
    overhead was not measurable (<= 0: the compressed run was within the timing noise of the line)."""
    if b <= 0 or ratio >= 1 or overhead_s <= 0:
        return None
    return overhead_s / (b * (1 - ratio))


def recommendation_doc(best: dict | None, rows: list[dict], attention_rec: dict, seeds: list[int], rerun_best: dict | None,
                       estimate: dict | None = None) -> dict:  # fmt: skip
    """The content of recommendation.json (schema and schema_version first)."""
    doc = stamp("ad-compression-recommendation", {})
    if best is None:
        doc.update({"strategy": "none", "ratio": 1.0, "interval": None, "engine": rows[0]["engine"] if rows else None,
                    "measured_speedup": None, "measured_performance_loss": None, "loss_stderr": None})  # fmt: skip
    else:
        doc.update({"strategy": best["strategy"], "ratio": best["ratio"], "interval": best["interval"], "engine": best["engine"],
                    "params": best["params"], "measured_speedup": best["speedup"],
                    "measured_performance_loss": best["performance_loss"], "loss_stderr": best["performance_loss_stderr"]})  # fmt: skip
    doc.update({"max_loss": MAX_LOSS, "seeds": list(seeds), "candidates": rows, "rerun_best": rerun_best,
                "attention_only_suggestion": attention_rec, "estimate": estimate})  # fmt: skip
    return doc


def verdict_lines(doc: dict) -> list[str]:
    """Plain-language verdict from the measured rows, for compression_recommendations.txt and the console."""
    rows = doc["candidates"]
    lines = ["Measured verdict", "----------------"]
    for r in rows:
        se = r["performance_loss_stderr"]
        loss = f"{100 * r['performance_loss']:.1f}%" + (f" +- {100 * se:.1f}%" if se is not None else "")
        noise = " (within noise)" if se is not None and abs(r["performance_loss"]) <= 2 * se else ""
        lines.append(f"  {r['strategy']:<13} ratio {r['ratio']:<5} {r['engine']:<7} speedup {r['speedup']:.2f}x "
                     f"(pairs {r['speedup_pair_min']:.2f}-{r['speedup_pair_max']:.2f}), return loss {loss}{noise}")  # fmt: skip
    n = len(doc["seeds"])
    if doc["strategy"] != "none":
        lines.append(f"Recommended: {doc['strategy']} at compression_ratio {doc['ratio']}, interval {doc['interval']} "
                     f"({doc['engine']} engine): {doc['measured_speedup']:.2f}x faster, "
                     f"{100 * doc['measured_performance_loss']:.1f}% loss over {n} seed(s).")  # fmt: skip
        return lines
    best = max(rows, key=lambda r: r["speedup"]) if rows else None
    engine = rows[0]["engine"] if rows else "?"
    head = f"best candidate {best['speedup']:.2f}x" if best else "no candidate"
    lines.append(f"Recommended: none. With the {engine} engine at this context length, compression does not pay within "
                 f"{100 * doc['max_loss']:.0f}% loss: {head}.")  # fmt: skip
    rb = doc.get("rerun_best")
    if rb:
        lines.append(f"What would pay instead: a model that re-runs its window (rerun engine) gains {rb['speedup']:.2f}x "
                     f"with {rb['strategy']} at ratio {rb['ratio']} ({100 * rb['performance_loss']:.1f}% loss, "
                     f"{len(rb['seeds'])} seed(s), {rb['episodes']} episodes).")  # fmt: skip
    est = doc.get("estimate")
    if est and est["b_ms_per_token"] > 0 and est["overhead_ms"] <= 0:
        lines.append(f"Estimate from measured step costs ({est['a_ms']:.3f} ms + {1000 * est['b_ms_per_token']:.3f} us per context token "
                     f"per step): the compressed rollout's own overhead was within this run's timing noise "
                     f"({est['overhead_ms']:.3f} ms per step), so no break-even context can be estimated from it; "
                     "the measured speedups above are what compression gives here.")  # fmt: skip
    elif est and est.get("break_even_context") is not None:
        lines.append(f"Estimate from measured step costs ({est['a_ms']:.3f} ms + {1000 * est['b_ms_per_token']:.3f} us per context token "
                     f"per step, compression overhead {est['overhead_ms']:.3f} ms per step): compression at ratio {est['ratio']} "
                     f"pays above about {est['break_even_context']:.0f} tokens of context at this batch of {est['batch']} "
                     f"environments (the model's context is {est['context']}); larger batches raise the attention share.")  # fmt: skip
    elif est:
        lines.append("Estimate from measured step costs: the cached step's time does not grow measurably with the context "
                     "here, so shortening it cannot pay at this batch size.")  # fmt: skip
    return lines
