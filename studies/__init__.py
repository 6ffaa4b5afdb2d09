"""residscope.studies: drivers that combine analyses, probes and surgery into the experiments behind the write-ups.

`findings` runs the measurements of docs/findings.md (`python -m residscope.studies.findings QUESTION`). A study only
chooses settings, calls library functions and writes their results and figures; it sits above `analyses`, `probes`
and `surgery` (it uses all three) and below `apps`. May import everything but `apps`; nothing in the library below
imports a study.
"""
