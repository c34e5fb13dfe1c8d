"""trustmesh benchmarks: ``python -m bench NAME [--json]``.

Every figure is printed beside an anchor measured in the same run, as a ratio, because
absolute times on shared machines drift. Higher ratios are better.
"""
