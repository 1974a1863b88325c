"""Fault profiles and decisions, as pure logic."""

from __future__ import annotations

import random

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mock_server import MockState, faults
from mock_server.faults import (
    DECISION_ORDER,
    STREAM_ONLY,
    Decision,
    FaultKind,
    FaultProfile,
    ProfileError,
    decide,
    parse_failures_config,
    parse_fault_header,
)

PROBABILITY_FIELDS = [f"{kind.value}_probability" for kind in FaultKind]
DURATION_FIELDS = [
    "timeout_duration_seconds",
    "retry_after_seconds",
    "stream_stall_seconds",
    "first_token_delay_seconds",
    "latency_ms",
    "chunk_delay_ms",
]


def test_the_issue_names_every_field():
    issue_fields = {
        "timeout_probability", "timeout_duration_seconds", "rate_limit_probability",
        "retry_after_seconds", "server_error_probability", "reset_probability",
        "stream_cut_probability", "stream_cut_after_chunks", "stream_stall_probability",
        "stream_stall_seconds", "malformed_chunk_probability", "slow_first_token_probability",
        "first_token_delay_seconds", "latency_ms", "seed",
    }  # fmt: skip
    extra_fields = {
        "no_done_probability", "chunk_delay_ms", "prefill_supported", "stream_fault_after_chunks",
    }  # fmt: skip
    assert {field.name for field in attrs.fields(FaultProfile)} == issue_fields | extra_fields


def test_defaults_are_healthy_with_meaningful_shapes():
    profile = FaultProfile()
    assert all(profile.probability(kind) == 0 for kind in FaultKind)
    assert profile.timeout_duration_seconds == 3
    assert profile.retry_after_seconds == 1
    assert profile.stream_cut_after_chunks == 2
    assert profile.stream_stall_seconds == 30
    assert profile.first_token_delay_seconds == 5
    assert (profile.latency_ms, profile.chunk_delay_ms) == (0, 0)
    assert profile.prefill_supported is True
    assert profile.seed is None


def test_the_seed_demo_bodies_parse():
    update = parse_failures_config({"timeout_probability": 0.7, "timeout_duration_seconds": 3})
    assert update.provider == "openai"
    assert update.profile == FaultProfile(timeout_probability=0.7, timeout_duration_seconds=3)
    assert parse_failures_config({}).profile == FaultProfile()


@pytest.mark.parametrize(
    ("provider", "targets"),
    [("openai", ("openai",)), ("anthropic", ("anthropic",)), ("all", ("openai", "anthropic"))],
)
def test_provider_picks_the_targets(provider, targets):
    update = parse_failures_config({"provider": provider, "rate_limit_probability": 1})
    assert faults.targets(update.provider) == targets
    assert update.profile.rate_limit_probability == 1.0


def test_numbers_are_stored_as_floats():
    profile = FaultProfile.from_fields({"rate_limit_probability": 1, "latency_ms": 20})
    assert type(profile.rate_limit_probability) is float
    assert profile.to_json()["latency_ms"] == 20.0


BAD_FIELDS = [
    *[(name, value) for name in PROBABILITY_FIELDS for value in (-0.1, 1.5, True, "0.5", None)],
    *[(name, value) for name in DURATION_FIELDS for value in (-1, float("inf"), False, "3", [])],
    ("timeout_probability", float("nan")),
    ("stream_cut_after_chunks", 2.0),
    ("stream_cut_after_chunks", -1),
    ("stream_cut_after_chunks", True),
    ("prefill_supported", 1),
    ("prefill_supported", "true"),
    ("seed", 1.5),
    ("seed", True),
    ("seed", "42"),
    ("provider", "azure"),
    ("provider", None),
    ("timeout_probabilty", 0.5),  # a typo is an unknown field, not a silent no-op
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_bad_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ProfileError) as caught:
        parse_failures_config({field: value})
    assert caught.value.field == field
    assert field in caught.value.message


@pytest.mark.parametrize("body", [[], "{}", 1, None, True])
def test_a_body_that_is_not_an_object_is_refused(body):
    with pytest.raises(ProfileError, match="JSON object"):
        parse_failures_config(body)


def test_fault_header_kinds():
    assert [parse_fault_header(kind.value) for kind in FaultKind] == list(FaultKind)
    assert parse_fault_header(" Stream_Cut ") is FaultKind.STREAM_CUT
    with pytest.raises(ValueError, match="unknown x-mock-fault 'explode'"):
        parse_fault_header("explode")


def test_the_decision_order_is_the_documented_one():
    assert [kind.value for kind in DECISION_ORDER] == [
        "timeout", "rate_limit", "server_error", "reset", "slow_first_token",
        "stream_cut", "stream_stall", "malformed_chunk", "no_done",
    ]  # fmt: skip


@pytest.mark.parametrize("kind", list(FaultKind))
def test_probability_one_always_and_zero_never(kind):
    rng = random.Random(7)
    always = FaultProfile(**{f"{kind.value}_probability": 1.0})
    assert {decide(always, rng, streaming=True).fault for _ in range(200)} == {kind}
    never = FaultProfile(
        **{f"{other.value}_probability": 1.0 for other in FaultKind if other is not kind}
    )
    assert kind not in {decide(never, rng, streaming=True).fault for _ in range(200)}


@pytest.mark.parametrize("kind", list(FaultKind))
def test_half_is_reproducible_and_roughly_half(kind):
    profile = FaultProfile(**{f"{kind.value}_probability": 0.5})

    def run(seed: int) -> list[bool]:
        rng = random.Random(seed)
        return [decide(profile, rng, streaming=True).fault is kind for _ in range(400)]

    first = run(99)
    assert first == run(99)
    assert first != run(100)
    assert 160 <= sum(first) <= 240


@pytest.mark.parametrize("kind", sorted(STREAM_ONLY, key=lambda kind: kind.value))
def test_stream_faults_pass_over_non_streaming_requests(kind):
    profile = FaultProfile(**{f"{kind.value}_probability": 1.0})
    assert decide(profile, random.Random(1), streaming=False) == Decision()


def test_earlier_kinds_win():
    profile = FaultProfile(timeout_probability=1.0, rate_limit_probability=1.0)
    assert decide(profile, random.Random(1), streaming=False).fault is FaultKind.TIMEOUT


def test_statuses():
    rng = random.Random(3)
    assert decide(FaultProfile(timeout_probability=1), rng, streaming=False).status == 504
    assert decide(FaultProfile(rate_limit_probability=1), rng, streaming=False).status == 429
    statuses = {
        decide(
            FaultProfile(server_error_probability=1),
            rng,
            streaming=False,
            server_error_statuses=(500, 529),
        ).status
        for _ in range(100)
    }
    assert statuses == {500, 529}
    forced = decide(
        FaultProfile(),
        rng,
        streaming=False,
        forced=FaultKind.SERVER_ERROR,
        server_error_statuses=(500, 529),
    )
    assert forced == Decision(FaultKind.SERVER_ERROR, 500)


probabilities = st.fixed_dictionaries({name: st.floats(0, 1) for name in PROBABILITY_FIELDS}).map(
    lambda fields: FaultProfile(**fields)
)


@given(
    profile=probabilities,
    streaming=st.booleans(),
    forced=st.none() | st.sampled_from(list(FaultKind)),
    seed=st.integers(),
)
def test_every_request_draws_the_same_amount(profile, streaming, forced, seed):
    # So a fault forced by header, or a change of probabilities, never shifts the
    # faults of the requests that follow.
    rng = random.Random(seed)
    decide(profile, rng, streaming=streaming, forced=forced)
    reference = random.Random(seed)
    for _ in DECISION_ORDER:
        reference.random()
    assert rng.random() == reference.random()


def test_state_configure_works_as_the_http_api():
    state = MockState.create(seed=1)
    state.configure(FaultProfile(rate_limit_probability=1.0, seed=5), "all")
    assert state["anthropic"].profile.rate_limit_probability == 1.0
    assert state["openai"].rng.random() == random.Random(5).random()
    state.configure(FaultProfile())  # openai only, as without "provider"
    assert state["openai"].profile == FaultProfile()
    assert state["anthropic"].profile.rate_limit_probability == 1.0
    with pytest.raises(ValueError, match="provider"):
        state.configure(FaultProfile(), "azure")
