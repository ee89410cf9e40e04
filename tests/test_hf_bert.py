"""A Hugging Face BERT (built from a small config, nothing downloaded): dict inputs, MLP neurons,
whole attention heads found without being told the head size, and the residual stream."""

import copy

import pytest
import torch

from helpers import EvenUnitsFirst, duplicate_odd_units
from lightning_intrafusion import OTConfig, prune
from lightning_intrafusion.surgery import replay_history

transformers = pytest.importorskip("transformers")

QUERY = "*.attention.self.query"


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32, attn_implementation="sdpa")
    model = transformers.BertForSequenceClassification(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    return model, inputs


def test_whole_model_prunes_and_keeps_running():
    model, inputs = _bert()
    shape = model(**inputs).logits.shape
    report = prune(model, inputs, 0.5)
    assert model(**inputs).logits.shape == shape
    assert report.params_after < 0.5 * report.params_before
    heads = [r for r in report.removals if r[0].endswith("attention.self.query") and r[1] == "out"]
    assert len(heads) == 2
    for _, _, removed in heads:  # whole heads of 16 channels, found from the attention call
        assert len(removed) == 32
        assert all(set(range(16 * h, 16 * h + 16)) <= set(removed) for h in {i // 16 for i in removed})
    model.train()
    model(**inputs, labels=torch.tensor([0, 1])).loss.backward()


def test_fusing_duplicated_heads_preserves_outputs():
    model, inputs = _bert()
    duplicate_odd_units(model, inputs, include=[QUERY], units={QUERY: 16})
    with torch.no_grad():
        expected = model.bert(**inputs).last_hidden_state
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    prune(fused, inputs, 0.5, include=[QUERY], importance=EvenUnitsFirst(16), ot_config=OTConfig(features="producer"))
    prune(plain, inputs, 0.5, include=[QUERY], importance=EvenUnitsFirst(16), method="default")
    with torch.no_grad():
        assert torch.allclose(fused.bert(**inputs).last_hidden_state, expected, atol=1e-5)
        assert (plain.bert(**inputs).last_hidden_state - expected).abs().max() > 1e-2


def test_masked_lm_with_tied_embeddings():
    """BertForMaskedLM ties its output layer to the word embeddings, with a dense layer (the prediction head's
    transform) between the stream and the output layer: the embedding's columns are the stream's channels, the
    output layer's the transform's, so the two widths are joined into one group and lose the same channels,
    the shared tensor's columns once; heads and feed-forward neurons are fused; the tie holds, and reloads."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32, attn_implementation="sdpa")
    model = transformers.BertForMaskedLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    report = prune(model, inputs, 0.5)
    assert not report.unsupported
    joined = [g for g in report.groups if "bert.embeddings.word_embeddings" in g.members]
    assert [(g.width_before, g.width_after) for g in joined] == [(64, 32)]
    assert "cls.predictions.transform.dense" in joined[0].members
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.bert.embeddings.word_embeddings.weight.shape == (100, 32)
    assert model.cls.predictions.transform.dense.weight.shape == (32, 32)
    fresh = transformers.BertForMaskedLM(config).eval()
    replay_history(fresh, [report.removals])
    fresh.load_state_dict(model.state_dict())
    assert fresh.cls.predictions.decoder.weight is fresh.bert.embeddings.word_embeddings.weight
    assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)