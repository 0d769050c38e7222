"""Comparisons of training methods: ``plan`` (the compare config), ``run`` (train, evaluate,
cache), ``tables`` (the paper's tables as data and Markdown)."""
