"""Config keys under either spelling: transformers reads a config.json key under its config class's `attribute_map`
name too (GPT-2's `num_hidden_layers` is `n_layer`, BLOOM's `n_head` is `num_attention_heads`), so a config.json
written with either must load the same model in residscope, and export must leave one spelling, with the new value."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch.testing import assert_close
from transformers import CONFIG_MAPPING

from conftest import save_hf
from family_zoo import CASES, VOCAB
from residscope.model import load_model
from residscope.model.config import DecoderConfig
from residscope.model.errors import ConfigError
from residscope.model.export import hf_config_of
from residscope.model.families import FAMILIES
from residscope.surgery import remove_layers

ALIASED = [t for t in sorted(FAMILIES) if t in CONFIG_MAPPING and CONFIG_MAPPING[t].attribute_map]
FIELDS = ("n_layers", "n_heads", "d_model", "d_head", "max_position_embeddings", "n_experts")


def test_every_attribute_map_pair_is_an_alias():
    """transformers' attribute_map is the truth: each of its pairs is a family alias (in whichever direction the family
    reads), so no family silently ignores a spelling transformers honours."""
    assert {"gpt2", "gptj", "gpt_neo", "bloom", "mixtral", "olmoe", "qwen3_moe"} <= set(ALIASED)
    for model_type in ALIASED:
        aliases = FAMILIES[model_type].aliases
        for alias, stored in CONFIG_MAPPING[model_type].attribute_map.items():
            assert aliases.get(alias) == stored or aliases.get(stored) == alias, (model_type, alias, stored)


def respell(config: dict, model_type: str) -> dict:
    """config with every attribute_map key spelled by its alias (and BLOOM's hidden_size as n_embed, which
    BloomConfig's __init__ takes)."""
    out = dict(config)
    for alias, key in CONFIG_MAPPING[model_type].attribute_map.items():
        if key in out:
            out[alias] = out.pop(key)
    if model_type == "bloom":
        out["n_embed"] = out.pop("hidden_size")
    assert out != config
    return out


def spellings(model_type: str) -> tuple[dict, dict]:
    """(config dict as transformers saves it, the same under the alias spellings)."""
    stored = CASES[model_type]().config.to_dict()
    return stored, respell(stored, model_type)


@pytest.mark.parametrize("model_type", ALIASED)
def test_either_spelling_reads_the_same_config(model_type):
    stored, aliased = spellings(model_type)
    theirs = CONFIG_MAPPING[model_type](**aliased)
    for alias, key in CONFIG_MAPPING[model_type].attribute_map.items():
        assert getattr(theirs, key) == stored[key]  # transformers reads the alias spelling as the stored key
    ours, ours_aliased = DecoderConfig.from_hf(stored), DecoderConfig.from_hf(aliased)
    for name in FIELDS:
        assert getattr(ours_aliased, name) == getattr(ours, name), name
    assert ours.n_layers == theirs.num_hidden_layers and ours.n_heads == theirs.num_attention_heads
    assert ours.d_model == theirs.hidden_size


@pytest.mark.parametrize("model_type", ["gpt2", "bloom"])
def test_conflicting_spellings_are_refused_in_one_line(model_type):
    stored, _ = spellings(model_type)
    key = "n_layer"
    with pytest.raises(ConfigError, match=rf"num_hidden_layers=7 and {key}=3 .* keep one") as e:
        DecoderConfig.from_hf({**stored, "num_hidden_layers": 7})
    assert "\n" not in str(e.value)
    assert DecoderConfig.from_hf({**stored, "num_hidden_layers": stored[key]}).n_layers == stored[key]


@pytest.mark.parametrize("model_type", ["gpt2", "bloom", "gpt_neo"])
def test_an_aliased_checkpoint_loads_and_exports_one_spelling(model_type, tmp_path):
    hf = CASES[model_type]().eval()
    folder = save_hf(hf, tmp_path)
    path = folder / "config.json"
    path.write_text(json.dumps(respell(json.loads(path.read_text()), model_type)))
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    model = load_model(folder, load_tokenizer=False)
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    out = hf_config_of(remove_layers(model, [1]))
    reads = FAMILIES[model_type].keys["num_hidden_layers"]
    assert out[reads] == 2 and (reads == "num_hidden_layers" or "num_hidden_layers" not in out)  # no stale spelling
    assert transformers.AutoConfig.for_model(**out).num_hidden_layers == 2
