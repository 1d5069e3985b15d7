"""Measurements: tasks and results, evaluation, lm-eval files, negative flips, TuCo, diagnostics."""
