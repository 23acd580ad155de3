"""The operator's erase settings (ESD_ERASE_DEFAULTS): laid between the base's defaults and a request's own settings,
per method and kind; a bad one refused in one line before any work."""

from __future__ import annotations

import json

import pytest

from esd.erase import EraseConfig
from esd.erase_defaults import ENV, EraseDefaultsError, load, settings


def test_a_request_gets_the_operator_defaults_of_its_method_and_kind_under_its_own(monkeypatch):
    assert settings("uce-tokens-adv", "style") == {"concept_kind": "style"}      # none set: the base's defaults
    monkeypatch.setenv(ENV, json.dumps({"uce-tokens-adv": {"attack_steps": 20, "attack_rounds": {"style": 1}},
                                        "esd-u-retain": {"iterations": {"object": 300, "*": 120}}}))
    assert settings("uce-tokens-adv", "style") == {"concept_kind": "style", "attack_steps": 20, "attack_rounds": 1}
    assert settings("uce-tokens-adv", "object") == {"concept_kind": "object", "attack_steps": 20}
    assert settings("esd-u-retain", "object")["iterations"] == 300
    assert settings("esd-u-retain", "nudity")["iterations"] == 120
    assert settings("esd-x", "style") == {"concept_kind": "style"}                # another method: untouched
    assert settings("uce-tokens-adv", "style", {"attack_steps": 5})["attack_steps"] == 5   # the request's own wins
    cfg = EraseConfig.with_overrides(["Vela Moreau"], "uce-tokens-adv", settings("uce-tokens-adv", "style"))
    assert (cfg.attack_steps, cfg.attack_rounds, cfg.concept_kind) == (20, 1, "style")


@pytest.mark.parametrize("value, message", [
    ("{not json", "not valid JSON"),
    ('["uce"]', "must map methods to settings"),
    ('{"esd-z": {}}', "unknown method 'esd-z'"),
    ('{"uce-tokens-adv": 3}', "uce-tokens-adv must map settings"),
    ('{"uce-tokens-adv": {"attack_stepz": 3}}', "unknown erase setting 'attack_stepz'"),
    ('{"uce-tokens-adv": {"attack_steps": 0}}', "attack_steps must be an integer from 1"),
    ('{"esd-u-retain": {"lr": {"object": NaN}}}', "esd-u-retain (object): lr must be > 0"),
    ('{"esd-x": {"attack_steps": 3}}', "attack_steps applies to closed-form methods"),
    ('{"uce": {"concept_kind": "object"}}', "concept_kind is the request's"),
    ('{"uce-tokens-adv": {"soft_tokens": {}}}', "recorded by an erasure"),
])
def test_bad_operator_erase_settings_are_refused_in_one_line(monkeypatch, value, message):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(EraseDefaultsError) as err:
        load()
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(EraseDefaultsError):
        settings("uce-tokens-adv", "style")          # a flow that reads them refuses too, before any work

