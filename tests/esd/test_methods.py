import pytest
import torch

from esd import methods
from esd.models import load_pipeline


@pytest.fixture(scope="module")
def unet(tiny_sd):
    return load_pipeline(tiny_sd).unet


def names(unet, method):
    return set(methods.select(unet, method))


def test_every_method_selects_what_its_row_says(unet):
    every = {n for n, _ in unet.named_parameters()}
    xattn = names(unet, "esd-x")
    assert xattn and all(".attn2." in n for n in xattn)
    assert {n for n in every if ".attn2." in n} == xattn
    strict = names(unet, "esd-x-strict")
    assert strict and strict < xattn and all(n.split(".attn2.")[1].split(".")[0] in ("to_k", "to_v") for n in strict)
    u = names(unet, "esd-u")
    assert not u & xattn and not any(n.startswith("time_embedding.") for n in u)
    assert "conv_in.weight" in u and any("time_emb_proj" in n for n in u)
    assert u | xattn | {n for n in every if n.startswith("time_embedding.")} == every
    assert names(unet, "esd-all") == every
    selfattn = names(unet, "selfattn")
    assert selfattn and all(".attn1." in n for n in selfattn)
    kv_weights = {n for n in strict if n.endswith(".weight")}
    assert names(unet, "uce-tokens") == names(unet, "uce-tokens-adv") == kv_weights and names(unet, "uce-tokens-esd") == u | kv_weights
    out = names(unet, "esd-xout-retain")
    assert out and out == {n for n in xattn if ".attn2.to_out." in n}
    assert names(unet, "uce-tokens-xout") == out | kv_weights
    assert methods.count(unet, "esd-x") == sum(p.numel() for n, p in unet.named_parameters() if n in xattn)


def test_unknown_method_is_refused(unet):
    with pytest.raises(methods.MethodError, match="unknown method 'esd-z'"):
        methods.select(unet, "esd-z")


def test_empty_selection_is_an_error():
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(methods.MethodError, match="selects no parameters"):
        methods.select(plain, "esd-x")
