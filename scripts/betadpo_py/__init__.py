"""Python shared by betadpo's scripts: the Hugging Face exporter (`export_hf`), feeds for exported LMs
(`lm_feeds`), the repository's paths (`paths`), a command runner and prompt batch for the end-to-end checks
(`runs`) and the shared fixtures rebuilt in PyTorch (`shared_fixtures`).

Scripts import it as an ordinary package (`from betadpo_py import export_hf`): every role folder
(`tools/`, `bench/`, `experiments/`, `fixtures/`) holds a relative symbolic link `betadpo_py -> ../betadpo_py`,
and Python puts a script's own folder first on its path, so `python scripts/tools/export_hf.py` finds it with any
interpreter and no installation. Modules that need the repository's folders resolve links first (`paths`).
"""
