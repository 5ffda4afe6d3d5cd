"""bench: reproducible speed, memory and resource benchmarks of tritonsplat (`python -m bench --help`).

Modules: cases (scene registry), harness (timing, memory, machine info, JSON), runner (config,
failures, backends), render / stages / step / compile_report (the benchmarks), targets (the project's
targets and the printed tables), baselines (gsplat), plot (PNGs), cli (click). See bench/README.md.
"""
