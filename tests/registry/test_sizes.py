"""The esd-x share of a UNet from parameter counts: no weights, no servers."""

from registry.sizes import SD1_UNET, method_fraction


def test_sd1_unet_counts():
    esd_x = method_fraction(SD1_UNET, "esd-x")
    assert esd_x["unet_parameters"] == 859_520_964          # the published size of the SD 1.x UNet
    assert esd_x["parameters"] == 43_962_560                 # every attn2 tensor (to_q, to_k, to_v, to_out)
    assert 0.051 < esd_x["fraction"] < 0.052
    assert method_fraction(SD1_UNET, "esd-x-strict")["fraction"] < 0.023
