"""Evaluation on labelled cases (docs/evaluation.md): the ``evaluate`` command, the methods it compares, baselines
and their tuning, per-case scoring, metrics, reports and the store of finished cases."""
