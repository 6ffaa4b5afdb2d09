"""Share of the decoder-only checkpoints researchers load whose architecture residscope loads.

The yardstick is TransformerLens's own model registry (`transformer_lens/tools/model_registry/data/
supported_models.json`, installed with transformer-lens): text-generation checkpoints with >= 500 downloads. Decoder-only
means an architecture named `*ForCausalLM` or `GPT2LMHeadModel`. An architecture counts as covered when a registered
residscope family (`residscope.model.families.FAMILIES`) names it; a checkpoint of a covered architecture can still
use an option residscope refuses (a quantization config, an unimplemented RoPE variant), so this is an upper bound
per checkpoint and an exact count per architecture.

    python benchmarks/family_coverage.py [--top 25] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
from importlib import resources


def registry_models() -> list[dict]:
    data = resources.files("transformer_lens") / "tools" / "model_registry" / "data" / "supported_models.json"
    return json.loads(data.read_text())["models"]


def is_decoder_only(architecture: str) -> bool:
    return architecture.endswith("ForCausalLM") or architecture == "GPT2LMHeadModel"


def coverage(models: list[dict], architectures: set[str]) -> dict:
    counts = collections.Counter(m["architecture_id"] for m in models if is_decoder_only(m.get("architecture_id") or ""))
    total = sum(counts.values())
    covered = {a: n for a, n in counts.items() if a in architectures}
    missing = sorted(((n, a) for a, n in counts.items() if a not in architectures), reverse=True)
    return {"decoder_only_checkpoints": total, "covered_checkpoints": sum(covered.values()),
            "share": sum(covered.values()) / total, "covered": dict(sorted(covered.items(), key=lambda kv: -kv[1])),
            "missing": [{"architecture": a, "checkpoints": n} for n, a in missing]}


def main() -> None:
    from residscope.model.families import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=25, help="how many missing architectures to list")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = coverage(registry_models(), {f.architecture for f in FAMILIES.values()})
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"families registered: {len(FAMILIES)} ({', '.join(sorted(FAMILIES))})")
    print(f"decoder-only checkpoints in the registry: {report['decoder_only_checkpoints']:,}")
    print(f"whose architecture residscope loads: {report['covered_checkpoints']:,} = {100 * report['share']:.1f}%")
    print("\ncovered:")
    for arch, n in report["covered"].items():
        print(f"  {arch:<40} {n:>6,}")
    print(f"\nmost common missing (top {args.top}):")
    for row in report["missing"][: args.top]:
        print(f"  {row['architecture']:<40} {row['checkpoints']:>6,}")


if __name__ == "__main__":
    main()
