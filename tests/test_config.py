"""The one settings loader: defaults, conversions, and errors that name the key."""

from __future__ import annotations

import pytest

from fedrad.common.config import (
    SERVER_ONLY_KEYS,
    Settings,
    load_settings,
    parse_overrides,
)
from fedrad.common.errors import ConfigError


def test_empty_run_config_gives_defaults() -> None:
    assert load_settings({}) == Settings()
    assert load_settings(None) == Settings()


def test_strings_are_converted_and_snake_case_accepted() -> None:
    s = load_settings({"local-epochs": "3", "learning-rate": "0.5", "equalize": "false"},
                      batch_size=8)
    assert (s.local_epochs, s.learning_rate, s.equalize, s.batch_size) == (3, 0.5, False, 8)


def test_unknown_key_names_it_and_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"local-epoch": 2})
    text = str(info.value)
    assert "'local-epoch'" in text and "Did you mean 'local-epochs'" in text
    assert "num-server-rounds" in text  # the accepted keys are listed


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"optimizer": "rmsprop"}, "'optimizer' must be one of sgd, adam, adamw"),
        ({"local-epochs": 0}, "'local-epochs' must be >= 1"),
        ({"local-epochs": 1.5}, "'local-epochs' must be an integer"),
        ({"batch-size": "many"}, "'batch-size' must be an integer"),
        ({"amp": "maybe"}, "'amp' must be true or false"),
        ({"val-fraction": 0.95}, "'val-fraction' must be <= 0.9"),
        ({"stem": "huge"}, "'stem' must be one of auto, standard, small"),
        ({"class-names": "a,b,c"}, "'class-names' lists 3 names but 'num-classes' is 2"),
    ],
)
def test_bad_values_name_the_key_and_what_is_accepted(config: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_settings(config)


def test_round_trip_and_site_config_drops_coordinator_paths() -> None:
    s = load_settings({"out-dir": "/srv/run", "central-eval-dir": "/srv/test", "seed": 4})
    assert load_settings(s.to_run_config()) == s
    site = s.to_site_config()
    assert not SERVER_ONLY_KEYS & set(site)
    assert site["seed"] == 4


def test_replace_validates() -> None:
    s = Settings()
    assert s.replace(num_classes=3).num_classes == 3
    with pytest.raises(ConfigError):
        s.replace(batch_size=0)


def test_classes_default_and_named() -> None:
    assert Settings().classes == ["class-0", "class-1"]
    assert load_settings({"class-names": "normal, pneumonia"}).classes == ["normal", "pneumonia"]


def test_parse_overrides() -> None:
    assert parse_overrides(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["oops"])


def test_fraction_train_under_secure_aggregation_is_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match="'fraction-train' 0.5 .*secure-aggregation=false"):
        load_settings({"fraction-train": 0.5})
    assert load_settings({"fraction-train": 0.5,
                          "secure-aggregation": False}).fraction_train == 0.5
