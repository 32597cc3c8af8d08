"""SamplingParams refuses bad values with an error that names the field."""

import pytest

from deepfleet.engine.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("seed", "42"),
        ("seed", 2**64),
        ("max_tokens", 0),
        ("logprobs", -1),
        ("logprobs", 21),
        ("stop", [""]),
        ("stop", ["ok", 3]),
        ("stop_token_ids", [-1]),
    ],
)
def test_invalid_value_names_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        SamplingParams(**{field: value})


def test_defaults_and_boundaries_are_accepted():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.logprobs) == (1, 1.0, 1.0, 0, 16, None)
    assert not p.greedy
    edge = SamplingParams(temperature=0, top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2, logprobs=20)
    assert edge.greedy
    assert SamplingParams(seed=-(2**63)).seed == -(2**63) and SamplingParams(seed=2**64 - 1).seed == 2**64 - 1


def test_single_stop_string_is_normalised_to_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
