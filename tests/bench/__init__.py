"""The gateway's benchmark: ``python -m tests.bench`` (``make bench``). See tests/bench/README.md.

Modules: ``upstream`` (a fast fake OpenAI server), ``loadgen`` (a cheap HTTP/1.1 load generator),
``scenarios`` (the points measured), ``config`` (the gateway configurations), ``procs`` (processes,
CPU pinning, /proc), ``targets`` and ``report`` (figures, verdicts, the table), ``run`` (the runner),
``profile`` (py-spy, with ``--profile``) and ``gcstats`` (GC pauses, with ``--gc``).
Excluded from pytest collection; tests/test_bench_smoke.py checks that the machinery works.
"""
