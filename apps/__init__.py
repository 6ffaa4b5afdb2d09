"""residscope.apps: the `residscope` command line (`cli*.py`, one module per feature, shared plumbing in `cli_common`)
and the Streamlit explorer (`explorer_*.py`). Thin layers over library functions: they parse input, call
`residscope.analyses` / `probes` / `surgery` / `model`, and print or draw the results. Nothing imports apps.
"""
