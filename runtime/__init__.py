"""residscope.runtime: how a model is run over data, below every analysis, probe and cut.

The batch loop (`runner.forward_batches`: in memory batch-major, or streamed layer-major from disk with `--offload`)
and data parallelism over torch.distributed (`distributed`: sharding batches over ranks, float64 all-reduces). They are
infrastructure, not measurements: analyses, probes and surgery all call them, so they sit under all three rather than
inside `analyses` (where surgery and probes importing them made the arrows point two ways). They are not in `model/`
either: the model knows how to run one forward (and, streamed, a list of batches: `model.offload`); choosing which
batches this rank sees and reducing the sums is a property of a corpus-level computation.
May import `residscope.common` and `residscope.model`; never `analyses`, `probes`, `surgery`, `studies` or `apps`.
"""
