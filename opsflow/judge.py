"""The canary judge: canary against baseline, metric by metric, in the manner of Kayenta's NetflixACAJudge.

Per metric (``classify``), as Kayenta's MannWhitneyClassifier:

- no data on either side, or fewer than ``min_samples`` values -> ``inconclusive`` (never a pass);
- identical samples, or all values equal -> ``pass``;
- otherwise a Mann-Whitney (Wilcoxon rank-sum) comparison: the p-value (normal approximation with the tie
  correction of the variance and a continuity correction, as R's ``wilcox.test(correct=TRUE)``), and the
  Hodges-Lehmann estimate of the shift canary - baseline with its distribution-free confidence interval at
  ``confidence`` (order statistics of the pairwise differences, the same tie-corrected variance and
  continuity correction). Kayenta's bounds are +-``tolerance`` x |estimate|: the metric is ``high`` when
  the interval's lower end lies above the upper bound, ``low`` when its upper end lies below the lower
  bound. Kayenta's later versions also require an effect size (the mean ratio canary/baseline) beyond a
  threshold; here that threshold is the same ``tolerance`` (ratio > 1 + tolerance for high, < 1 - tolerance
  for low), so a statistically clear but tiny shift (a few percent on a large sample) still passes.
- ``effect`` (per metric; default ``tolerance``) is the effect size: how far, relative, the canary may move
  before a statistically clear shift fails (0.1: 10 %; an error rate may allow less than a latency).
- ``missing`` (per metric, as Kayenta's nanStrategy) says what a missing or empty series, or NaN points, mean:
  ``zero`` -> the value is 0 (no 5xx series yet is no errors; the Prometheus activity fills the query's
  step grid with zeros, the judge replaces NaN), ``skip`` -> a side with no data leaves the metric out of
  the score (``skipped``), ``inconclusive`` (the default) -> the metric is inconclusive, never a pass.
- ``direction`` says which shift is bad: ``increase`` (only high fails), ``decrease`` (only low fails),
  ``either``.

The score (``judge``): 100 x passed / judged metrics (skipped ones are not judged), where inconclusive metrics
count as not passed (a
canary cannot pass on missing data). ``fail`` when a critical metric fails (score 0), else ``pass`` at or
above ``pass_score``, ``marginal`` at or above ``marginal_score``, else ``fail``. Any inconclusive metric
makes the whole result ``inconclusive`` unless something already failed.

Uses scipy; it runs inside an activity (``analysis.judge``), never in a workflow.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel

Direction = Literal["increase", "decrease", "either"]
Classification = Literal["pass", "high", "low", "inconclusive", "skipped"]
Missing = Literal["zero", "skip", "inconclusive"]
Verdict = Literal["pass", "marginal", "fail", "inconclusive"]


class MetricResult(BaseModel):
    name: str
    classification: Classification
    failed: bool
    critical: bool = False
    canary_n: int = 0
    baseline_n: int = 0
    canary_mean: float | None = None
    baseline_mean: float | None = None
    canary_median: float | None = None
    baseline_median: float | None = None
    ratio: float | None = None  # mean canary / mean baseline (Kayenta's effect size)
    estimate: float | None = None  # Hodges-Lehmann shift canary - baseline
    lower: float | None = None  # its confidence interval
    upper: float | None = None
    p_value: float | None = None
    reason: str = ""


class JudgeResult(BaseModel):
    verdict: Verdict
    score: float
    metrics: list[MetricResult]
    reason: str = ""


def _clean(values: list[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    return a[np.isfinite(a)]


def hodges_lehmann(canary: np.ndarray, baseline: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """The shift canary - baseline (median of all pairwise differences) and its confidence interval."""
    m, n = len(canary), len(baseline)
    diffs = np.sort(np.subtract.outer(canary, baseline).ravel())
    estimate = float(np.median(diffs))
    mn = m * n
    # Variance of U with the tie correction: ties shrink it.
    pooled = np.concatenate([canary, baseline])
    _, counts = np.unique(pooled, return_counts=True)
    big_n = m + n
    tie_term = float(np.sum(counts**3 - counts)) / (big_n * (big_n - 1)) if big_n > 1 else 0.0
    sigma = math.sqrt(mn / 12.0 * ((big_n + 1) - tie_term))
    from scipy import stats  # imported where used: at the top it cost every CLI run and worker start 0.5 s

    z = stats.norm.ppf(1 - (1 - confidence) / 2)
    # Number of differences cut from each end; the 0.5 is the continuity correction (a wider interval).
    k = int(math.floor(mn / 2.0 - z * sigma - 0.5))
    k = min(max(k, 0), (mn - 1) // 2)
    return estimate, float(diffs[k]), float(diffs[mn - 1 - k])


def _zeroed(values: list[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    return np.where(np.isfinite(a), a, 0.0)


def classify(name: str, canary: list[float], baseline: list[float], *, direction: Direction = "either",
             confidence: float = 0.98, tolerance: float = 0.25, min_samples: int = 5, critical: bool = False,
             effect: float | None = None, missing: Missing = "inconclusive") -> MetricResult:
    clean = _zeroed if missing == "zero" else _clean
    c, b = clean(canary), clean(baseline)
    tolerance = tolerance if effect is None else effect
    res = MetricResult(name=name, classification="inconclusive", failed=False, critical=critical, canary_n=len(c),
                       baseline_n=len(b))
    if len(c) == 0 or len(b) == 0:
        side = "canary" if len(c) == 0 else "baseline"
        if missing == "skip":
            res.classification, res.reason = "skipped", f"no data for the {side}: left out of the score (missing: skip)"
        else:
            res.reason = f"no data for the {side}"
        return res
    res.canary_mean, res.baseline_mean = float(np.mean(c)), float(np.mean(b))
    res.canary_median, res.baseline_median = float(np.median(c)), float(np.median(b))
    if res.baseline_mean != 0:
        res.ratio = res.canary_mean / res.baseline_mean
    elif res.canary_mean != 0:
        res.ratio = math.inf if res.canary_mean > 0 else -math.inf
    else:
        res.ratio = 1.0
    if len(c) < min_samples or len(b) < min_samples:
        res.reason = f"too few samples ({len(c)} canary, {len(b)} baseline; at least {min_samples} each)"
        return res
    if np.array_equal(np.sort(c), np.sort(b)) or len(np.unique(np.concatenate([c, b]))) == 1:
        res.classification, res.reason = "pass", "canary and baseline values are identical"
        return res
    from scipy import stats

    res.p_value = float(
        stats.mannwhitneyu(c, b, alternative="two-sided", use_continuity=True, method="asymptotic").pvalue
    )
    res.estimate, res.lower, res.upper = hodges_lehmann(c, b, confidence)
    bound = tolerance * abs(res.estimate)
    ratio = res.ratio
    high = res.lower > bound and (ratio is None or ratio > 1 + tolerance)
    low = res.upper < -bound and (ratio is None or ratio < 1 - tolerance)
    figures = (
        f"canary mean {res.canary_mean:.4g} vs baseline {res.baseline_mean:.4g} (x{ratio:.2f}), "
        f"shift {res.estimate:.4g} [{res.lower:.4g}, {res.upper:.4g}] at {confidence:.0%}"
    )
    if high and direction in ("increase", "either"):
        res.classification, res.failed, res.reason = "high", True, f"higher: {figures}"
    elif low and direction in ("decrease", "either"):
        res.classification, res.failed, res.reason = "low", True, f"lower: {figures}"
    else:
        res.classification = "pass"
        res.reason = (
            "higher, but an increase is not bad: "
            if high
            else "lower, but a decrease is not bad: "
            if low
            else "within tolerance: "
        ) + figures
    return res


def judge(metrics: list[MetricResult], *, pass_score: float = 95.0, marginal_score: float = 75.0) -> JudgeResult:
    """Score the metric verdicts as NetflixACAJudge does; a failed critical metric fails the canary at once."""
    skipped, all_metrics = [m for m in metrics if m.classification == "skipped"], metrics
    metrics = [m for m in metrics if m.classification != "skipped"]
    if not metrics:
        names = ", ".join(m.name for m in skipped)
        why = "no metrics to judge" + (f" (skipped for want of data: {names})" if skipped else "")
        return JudgeResult(verdict="inconclusive", score=0.0, metrics=all_metrics, reason=why)
    result = _score(metrics, pass_score, marginal_score)
    result.metrics = all_metrics
    if skipped:
        result.reason += f" ({len(skipped)} skipped for want of data: {', '.join(m.name for m in skipped)})"
    return result


def _score(metrics: list[MetricResult], pass_score: float, marginal_score: float) -> JudgeResult:
    critical = [m for m in metrics if m.failed and m.critical]
    passed = sum(1 for m in metrics if m.classification == "pass" and not m.failed)
    score = round(100.0 * passed / len(metrics), 1)
    failed = [m for m in metrics if m.failed]
    inconclusive = [m for m in metrics if m.classification == "inconclusive"]
    if critical:
        return JudgeResult(verdict="fail", score=0.0, metrics=metrics,
                           reason="critical metric failed: " + "; ".join(f"{m.name}: {m.reason}" for m in critical))
    if score >= pass_score:
        return JudgeResult(verdict="pass", score=score, metrics=metrics, reason=f"score {score:g} >= {pass_score:g}")
    if inconclusive and not failed:
        return JudgeResult(verdict="inconclusive", score=score, metrics=metrics,
                           reason="inconclusive: " + "; ".join(f"{m.name}: {m.reason}" for m in inconclusive))
    why = "; ".join(f"{m.name}: {m.reason}" for m in failed + inconclusive)
    if score >= marginal_score:
        return JudgeResult(
            verdict="marginal",
            score=score,
            metrics=metrics,
            reason=f"score {score:g} (marginal >= {marginal_score:g}): {why}",
        )
    return JudgeResult(
        verdict="fail", score=score, metrics=metrics, reason=f"score {score:g} < {marginal_score:g}: {why}"
    )
