"""Non-uniform sparsity: layer specs, scopes and per-layer overrides."""

import pytest

from stages.errors import RacError
from stages.selection import check_layers, in_scope, layer_sparsities, parse_layers


def test_presets_follow_the_paper_thirds() -> None:
    assert parse_layers("all", 28) == set(range(28))
    assert parse_layers("first_third", 28) == set(range(10))
    assert parse_layers("first_and_last_third", 28) == set(range(10)) | set(range(18, 28))
    assert parse_layers("first_third", 4) == {0, 1}


def test_ranges_are_inclusive_and_combine() -> None:
    assert parse_layers("0-2,5,7-8", 10) == {0, 1, 2, 5, 7, 8}


@pytest.mark.parametrize("spec", ["0-", "a", "3-1", "", "1-2;4", "first-third"])
def test_bad_layer_specs(spec: str) -> None:
    with pytest.raises(RacError, match="layer spec"):
        check_layers(spec)


def test_layer_range_out_of_bounds_names_the_model_depth() -> None:
    with pytest.raises(RacError, match=r"'2-4' is out of bounds: the model has layers 0-3"):
        parse_layers("0,2-4", 4)


def test_scope() -> None:
    assert in_scope("self_attn.q_proj", "attn") and not in_scope("self_attn.q_proj", "mlp")
    assert in_scope("mlp.down_proj", "mlp") and not in_scope("mlp.down_proj", "attn")
    assert in_scope("mlp.up_proj", "all") and in_scope("self_attn.o_proj", "all")


def test_overrides_take_precedence() -> None:
    got = layer_sparsities(0.6, "all", "0-2", {"1": 0.3, "3": 0.5}, 4)
    assert got == {0: 0.6, 1: 0.3, 2: 0.6, 3: 0.5}
