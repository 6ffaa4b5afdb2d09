"""One rank of the data-parallel tests: joins the gloo group from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, runs
Block Influence, the other pruning criteria (one-shot perplexity, SLEB, BlockPruner, angular distance, Taylor),
perplexity, the positional decomposition, attention statistics and sliding-window (extension) perplexity on a
checkpoint folder, and rank 0 writes the results.

    python dist_worker.py CHECKPOINT OUT.safetensors [fail-rank]
"""

import sys

import torch
import torch.distributed as dist

from residscope.analyses.extension import sliding_window_perplexity
from residscope.analyses.perplexity import perplexity
from residscope.analyses.positional import attention_statistics, decompose_positions
from residscope.model import load_model
from residscope.surgery import block_influence_result
from residscope.surgery.criteria import angular_distances, blockprune_order, one_shot_ppl, sleb_order, taylor_scores


def batches(vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return list(torch.randint(0, vocab, (10, 24), generator=gen).split(2))  # 5 batches: ranks get 3 and 2


def results(model) -> dict[str, torch.Tensor]:
    data = batches(model.cfg.d_vocab)
    mask = torch.ones_like(data[0])
    mask[0, :5] = 0  # left padding in one batch: per-batch masks must reach the hooks of that batch
    padded = [(data[0], mask), *data[1:]]
    bi = block_influence_result(model, padded, progress=False)
    ppl = perplexity(model, padded, progress=False)
    dec = decompose_positions(model, data, progress=False)
    att = attention_statistics(model, data, progress=False)
    stream = torch.cat([b.reshape(-1) for b in data])  # 240 tokens: 9 windows of 48, 3 batches of 4 / 4 / 1
    _, window_nll, window_tokens, _ = sliding_window_perplexity(model, stream, 48, batch_size=4, progress=False)
    sleb = sleb_order(model, padded, 2, progress=False)
    blockprune = blockprune_order(model, padded, 1, progress=False)
    criteria = {"ppl_scores": torch.tensor(one_shot_ppl(model, padded, 1, progress=False).scores),
                "sleb_order": torch.tensor(sleb.order, dtype=torch.float64),
                "sleb_ppl": torch.tensor([s["ppl"] for s in sleb.steps]),
                "blockprune_ppl": torch.tensor([s["ppl"] for s in blockprune.steps]),
                "angular_block": angular_distances(model, padded, 1, progress=False)[0],
                "taylor": taylor_scores(model, padded, progress=False)[0]}
    return {**criteria, "bi": bi.scores, "bi_n_tokens": torch.tensor(float(bi.n_tokens)), "nll": torch.tensor(ppl.nll),
            "ppl_n_tokens": torch.tensor(float(ppl.n_tokens)), "vectors": dec.vectors,
            "second_moment": dec.second_moment, "n_samples": torch.tensor(float(dec.n_samples)),
            "sink_mass": torch.from_numpy(att.sink_mass), "by_distance": torch.from_numpy(att.by_distance),
            "window_nll": torch.tensor(window_nll), "window_tokens": torch.tensor(float(window_tokens))}


def main(folder: str, out: str, fail_rank: str | None = None) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if fail_rank is not None and dist.get_rank() == int(fail_rank):
            raise RuntimeError(f"injected failure on rank {dist.get_rank()}")
        model = load_model(folder, dtype=torch.float64)
        res = results(model)
        if dist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in res.items()}, out)
        dist.barrier()  # leave together, as apps/workers.py does
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
