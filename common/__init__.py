"""residscope.common: small helpers every layer shares and that know nothing of models or analyses.

`atomic` writes files and folders so that readers never see half of one (and checks output paths before the work);
`batches` is the token-batch format that perplexity, Block Influence and the other streaming passes accept; `errors`
holds `InputError`, the class of every user mistake. Imports only the standard library and torch, never
another residscope package, so `model`, `analyses`, `probes`, `surgery` and `apps` can all import it.
"""
