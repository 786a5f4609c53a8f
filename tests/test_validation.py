"""Bad input fails at the public boundary with an error naming the argument."""
import pytest
import torch

import genjo_fast
from genjo_fast.testing import TinyBidirectionalLM

from conftest import MASK_ID, VOCAB

PROMPT = torch.tensor([[1, 2, 3], [4, 5, 6]])


def call(model, prompt=PROMPT, **kw):
    args = dict(steps=4, gen_length=8, block_length=4, mask_id=MASK_ID)
    args.update(kw)
    return genjo_fast.generate(model, prompt, **args)


@pytest.mark.parametrize("kw,error,match", [
    (dict(prompt=torch.tensor([1, 2, 3])), ValueError, "prompt must have shape"),
    (dict(prompt=torch.ones(2, 3)), TypeError, "prompt must hold integer"),
    (dict(prompt=[[1, 2]]), TypeError, "prompt must be a torch.Tensor"),
    (dict(prompt=torch.ones(0, 3, dtype=torch.long)), ValueError, "empty batch"),
    (dict(gen_length=10), ValueError, r"gen_length \(10\) must be a multiple of block_length"),
    (dict(steps=3), ValueError, r"steps \(3\) must be a multiple of the number of blocks"),
    (dict(steps=0), ValueError, "steps must be >= 1"),
    (dict(block_length=2.0), TypeError, "block_length must be an int"),
    (dict(attention_mask=torch.ones(2, 4)), ValueError, "attention_mask shape"),
    (dict(attention_mask=torch.full((2, 3), 2)), ValueError, "attention_mask must hold only"),
    (dict(prompt=torch.tensor([[1, MASK_ID, 3]])), ValueError, "mask_id=129 in its real tokens"),
    (dict(prompt=torch.tensor([[MASK_ID, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]])),
     ValueError, "mask_id=129 in its padding"),
    (dict(remasking="top_p"), ValueError, "remasking must be one of"),
    (dict(temperature=-0.1), ValueError, "temperature must be finite and >= 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite and >= 0"),
    (dict(cfg_scale=-1.0), ValueError, "cfg_scale must be finite and >= 0"),
    (dict(mask_id=VOCAB + 5, prompt=torch.tensor([[1, 2]])), ValueError,
     "mask_id=135 is outside the model vocabulary"),
    (dict(logits_eos_inf=True, eos_id=VOCAB), ValueError, "eos_id=130 is outside"),
    (dict(backend="cuda-magic"), ValueError, "backend='cuda-magic' is not known"),
    (dict(cfg_scale=float("inf")), ValueError, "cfg_scale must be finite and >= 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be finite and >= 0"),
    (dict(cfg_scale=float("nan")), ValueError, "cfg_scale must be finite and >= 0, got nan"),
    (dict(prompt=torch.tensor([[1, 2]], device="meta")), ValueError,
     "prompt is on the meta device"),
    (dict(prompt=torch.tensor([[1, VOCAB + 3]])), ValueError,
     r"prompt holds token ids outside the model vocabulary \[0, 130\)"),
    (dict(prompt=torch.tensor([[-1, 2]])), ValueError, "prompt holds token ids outside"),
    (dict(generator="seed"), TypeError, "generator must be a torch.Generator"),
])
def test_bad_arguments(tiny_model, kw, error, match):
    with pytest.raises(error, match=match):
        call(tiny_model, **kw)


def test_vocab_checked_from_logits_without_config():
    def model(x, attention_mask=None):
        return torch.zeros(*x.shape, 50)

    with pytest.raises(ValueError, match="mask_id=129 is outside the model vocabulary"):
        call(model)


def test_bad_logits_shape():
    def model(x, attention_mask=None):
        return torch.zeros(x.shape[0], VOCAB)

    with pytest.raises(ValueError, match="the model returned logits of shape"):
        call(model)


def test_env_backend(tiny_model, monkeypatch):
    monkeypatch.setenv("GENJO_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="GENJO_FAST_BACKEND='nope' is not known"):
        call(tiny_model)
    monkeypatch.setenv("GENJO_FAST_BACKEND", "torch")
    assert call(tiny_model).shape == (2, 11)


def test_model_with_config_vocab():
    model = TinyBidirectionalLM(100, d_model=16, n_heads=2, n_layers=1)
    with pytest.raises(ValueError, match=r"vocab_size = 100"):
        call(model)


def test_model_returning_a_tuple():
    """A transformers model called with return_dict=False returns a tuple: the error says
    what was expected instead of an AttributeError."""
    def model(x, attention_mask=None):
        return (torch.zeros(*x.shape, VOCAB),)

    with pytest.raises(TypeError, match=r"the model returned tuple; expected an object with a "
                                        r"\.logits tensor"):
        call(model)


def test_meta_device_model():
    with torch.device("meta"):
        model = TinyBidirectionalLM(VOCAB, d_model=16, n_heads=2, n_layers=1, seed=None)
    with pytest.raises(ValueError, match="the model's parameters are on the meta device"):
        call(model)
