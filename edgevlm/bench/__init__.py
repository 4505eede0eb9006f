"""Latency benchmarking across visual-token budgets: ``edgevlm bench`` (docs/bench.md).

Modules: ``env`` (environment block + rooflines), ``workload`` (distinct synthetic images, exact-length prompts),
``sweep`` (sessions x configurations, one subprocess per session), ``fit`` (MobileVLM's Eq. 4 by least squares, with
held-out predictions), ``report`` (JSON schema, Markdown, PNG charts), ``compare`` (regressions beyond the measured
spread), ``budgets`` (export a budget sweep's bundles sharing one decoder; imports torch only there).

Nothing here imports torch except ``budgets`` (inside its export functions); submodules are imported on use.

    >>> from edgevlm.bench.sweep import SweepSpec
    >>> from edgevlm.cli.bench import run_bench
    >>> report = run_bench(SweepSpec(bundles=["bundles/b144"], prompt_tokens=[16, 64], output_tokens=[8, 32]))
"""
