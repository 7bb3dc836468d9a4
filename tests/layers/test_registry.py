import pytest
import torch

from mnemotorch.layers import Mixer, get_mixer, list_mixers, mixer_info, register_mixer


def test_foundation_mixers_registered() -> None:
    names = list_mixers()
    assert "attention" in names and "sliding_window" in names


def test_unknown_name_lists_registered() -> None:
    with pytest.raises(KeyError) as err:
        get_mixer("no_such_mixer", dim=8, num_heads=2)
    assert "attention" in str(err.value) and "sliding_window" in str(err.value)


def test_unknown_argument_is_named() -> None:
    with pytest.raises(TypeError, match="windw"):
        get_mixer("sliding_window", dim=8, num_heads=2, windw=3)


@pytest.mark.parametrize("kwargs,match", [({"dim": 10, "num_heads": 4}, "divisible"), ({"dim": 8, "num_heads": 2, "window": 0}, "window")])
def test_bad_constructor_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        get_mixer("sliding_window", **kwargs)


def test_register_rejects_non_mixer_and_duplicates() -> None:
    with pytest.raises(TypeError):
        register_mixer("bogus")(object)

    class Other(Mixer):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_mixer("attention")(Other)


def test_mixer_info() -> None:
    info = mixer_info("sliding_window")
    assert info["arguments"]["window"] == 64 and info["description"]


def test_sliding_window_state_is_bounded() -> None:
    m = get_mixer("sliding_window", dim=16, num_heads=2, window=4)
    _, state = m(torch.randn(1, 50, 16))
    assert state.k.shape[1] == 3 and state.seen_tokens == 50
    assert m.state_size(10_000) == m.state_size(4)
