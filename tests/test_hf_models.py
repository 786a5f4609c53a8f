"""Any transformers model returning ``.logits`` works: a randomly initialised BERT masked LM."""
import pytest
import torch

import genjo_fast
from genjo_fast import TensorDraws, reference
from genjo_fast.testing import random_prompts

transformers = pytest.importorskip("transformers")

VOCAB, MASK_ID, PAD_ID = 97, 96, 0


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64, pad_token_id=PAD_ID)
    return transformers.BertForMaskedLM(config).eval()


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_bert_matches_reference(bert, cfg_scale, temperature):
    prompt, attention_mask = random_prompts(3, 6, VOCAB, pad_id=PAD_ID, avoid=(MASK_ID, PAD_ID))
    kw = dict(steps=8, gen_length=8, block_length=4, temperature=temperature,
              cfg_scale=cfg_scale, mask_id=MASK_ID)
    g = torch.Generator().manual_seed(0)
    draws = TensorDraws(torch.rand(8, 3, 14, VOCAB, generator=g, dtype=torch.float64))
    ref = reference.generate(bert, prompt, attention_mask, draws=draws, **kw)
    out = genjo_fast.generate(bert, prompt, attention_mask, draws=draws, **kw)
    assert torch.equal(out, ref)
    assert not (out == MASK_ID).any()


def test_bert_vocab_checked_from_config(bert):
    with pytest.raises(ValueError, match="mask_id=126336 is outside the model vocabulary"):
        genjo_fast.generate(bert, torch.tensor([[5, 6]]), steps=2, gen_length=2, block_length=2)
