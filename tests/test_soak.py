"""The chaos soak: its judge of answers, its fault mixes, its checks, and a short run.

The short run is the CI version of ``make soak``: a few hundred requests through a
gateway and a mock that the soak starts as processes of their own (so the gateway's
memory is read from ``/proc``), with the same checks as the full run. The judge must be
able to fail, so it is tested on answers the gateway never gives -- a stream cut without
``[DONE]`` or an error event above all -- and the whole soak is pointed once at the bare
mock, whose cut streams nothing repairs: it must exit non-zero.
"""

from __future__ import annotations

import random
import sys

import httpx
import orjson
import pytest
import trio

from mock_server.faults import STREAM_ONLY, FaultKind, FaultProfile
from orchestrator import soak
from orchestrator.load import LoadOptions, Planner, exchange
from orchestrator.soak import (
    SoakOptions,
    UsageError,
    Verdict,
    draw_profile,
    exit_status_of,
    judge_answer,
    judge_headers,
    judge_run,
    run_soak,
)

SSE = "text/event-stream; charset=utf-8"
JSON = "application/json"


def chunk(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    event = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(event) + b"\n\n"


def error_body(code: str = "stream_interrupted") -> dict:
    return {"error": {"message": "it broke", "type": "server_error", "param": None, "code": code}}


ROLE = chunk()
WORDS = chunk("hello") + chunk(" world")
FINISH = chunk(finish="stop")
DONE = b"data: [DONE]\n\n"
ERROR_EVENT = b"data: " + orjson.dumps(error_body()) + b"\n\n"
COMPLETION = orjson.dumps(
    {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                               "finish_reason": "stop"}]}
)


# -- the judge -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "content_type", "body", "expected"),
    [
        (200, SSE, ROLE + WORDS + FINISH + DONE, Verdict("complete")),
        (200, SSE, ROLE + WORDS + ERROR_EVENT, Verdict("error")),
        (200, JSON, COMPLETION, Verdict("complete")),
        (504, JSON, orjson.dumps(error_body("deadline_exceeded")), Verdict("error")),
        (429, JSON, orjson.dumps(error_body(None)), Verdict("error")),
        # A cut stream: content, then nothing -- no [DONE], no error event.
        (200, SSE, ROLE + WORDS, Verdict("malformed", "no_done")),
        (200, SSE, ROLE + WORDS + FINISH, Verdict("malformed", "no_done")),
        (200, SSE, b"", Verdict("malformed", "no_done")),
        (200, SSE, ROLE + WORDS + DONE, Verdict("malformed", "done_without_finish_reason")),
        (200, SSE, ROLE + WORDS + ERROR_EVENT + DONE, Verdict("malformed", "data_after_error")),
        (200, SSE, ROLE + WORDS + FINISH + DONE + WORDS, Verdict("malformed", "data_after_done")),
        (200, SSE, ROLE + WORDS + b'data: {"choi', Verdict("malformed", "partial_event")),
        (200, SSE, ROLE + b"data: {not json\n\n" + FINISH + DONE, Verdict("malformed", "invalid_event")),
        (200, SSE, ROLE + b'data: {"id": "x"}\n\n' + FINISH + DONE, Verdict("malformed", "invalid_chunk")),
        (200, SSE, ROLE + b'data: {"error": "bad"}\n\n', Verdict("malformed", "unshaped_error_event")),
        (500, SSE, ERROR_EVENT, Verdict("malformed", "stream_with_status_500")),
        (200, JSON, b'{"choices": []}', Verdict("malformed", "incomplete_completion")),
        (200, JSON, b'{"choices": [{"message": {"content": "hi"}, "finish_reason": null}]}',
         Verdict("malformed", "incomplete_completion")),
        (200, JSON, COMPLETION[:-5], Verdict("malformed", "incomplete_completion")),
        (502, "text/html", b"<html>Bad Gateway</html>", Verdict("malformed", "unshaped_error_502")),
        (500, JSON, b'{"error": {"message": "no type"}}', Verdict("malformed", "unshaped_error_500")),
        (204, JSON, b"", Verdict("malformed", "unexpected_status_204")),
    ],
)
def test_judge_answer(status, content_type, body, expected):
    assert judge_answer(status, content_type, body) == expected


def test_a_complete_answer_must_carry_the_reply_to_its_own_prompt():
    # The mock's reply is a function of the prompt: a gateway that mixes up answers, or
    # continues a broken stream with a piece repeated or lost, sends the wrong text.
    stream = ROLE + WORDS + FINISH + DONE
    assert judge_answer(200, SSE, stream, expected="hello world") == Verdict("complete")
    assert judge_answer(200, SSE, stream, expected="hello there") == Verdict("malformed", "wrong_content")
    repeated = ROLE + WORDS + chunk(" world") + FINISH + DONE
    assert judge_answer(200, SSE, repeated, expected="hello world") == Verdict("malformed", "wrong_content")
    assert judge_answer(200, JSON, COMPLETION, expected="hi") == Verdict("complete")
    assert judge_answer(200, JSON, COMPLETION, expected="ho") == Verdict("malformed", "wrong_content")
    # Errors carry no reply to compare.
    assert judge_answer(200, SSE, ROLE + WORDS + ERROR_EVENT, expected="x") == Verdict("error")


def test_headers_must_echo_the_request_id_and_give_a_retry_after_when_shedding():
    good = {"x-request-id": "load-1-7", "retry-after": "2"}
    assert judge_headers(200, {"x-request-id": "load-1-7"}, "load-1-7") is None
    assert judge_headers(503, good, "load-1-7") is None and judge_headers(429, good, "load-1-7") is None
    assert judge_headers(200, {}, "load-1-7") == Verdict("malformed", "request_id_mismatch")
    assert judge_headers(200, {"x-request-id": "load-1-8"}, "load-1-7") == Verdict("malformed", "request_id_mismatch")
    assert judge_headers(503, {"x-request-id": "load-1-7"}, "load-1-7") == Verdict("malformed", "no_retry_after_503")
    assert judge_headers(502, {"x-request-id": "load-1-7"}, "load-1-7") is None


def test_crlf_event_streams_are_read_like_lf_ones():
    body = (ROLE + WORDS + FINISH + DONE).replace(b"\n", b"\r\n")
    assert judge_answer(200, SSE, body) == Verdict("complete")


def test_a_body_that_did_not_reach_its_end_is_never_complete():
    assert judge_answer(200, SSE, ROLE + WORDS + FINISH + DONE, whole=False).kind == "malformed"


async def test_a_truncated_stream_through_exchange_is_malformed_not_lost():
    # The load script's own exchange(), over the soak's watching transport, against a
    # server whose stream stops after its content: answered, and judged malformed.
    bodies = {"complete": ROLE + WORDS + FINISH + DONE, "cut": ROLE + WORDS}

    def handler(request: httpx.Request) -> httpx.Response:
        request_id = request.headers["x-request-id"]
        kind = "cut" if request_id.endswith("-1") else "complete"
        headers = {"content-type": SSE, "x-request-id": request_id}
        return httpx.Response(200, headers=headers, content=bodies[kind])

    transport = soak._WatchingTransport(httpx.MockTransport(handler))
    planner = Planner(LoadOptions.for_bursts(bursts=1, concurrency=2, stream=1.0, seed=3))
    verdicts = []
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        for _ in range(2):
            plan = planner.next(None)
            result = await exchange(client, plan, timeout=5, origin=0.0)
            assert result.outcome != "lost"
            verdicts.append(transport.verdict(plan.request_id, result))
    assert verdicts == [Verdict("complete"), Verdict("malformed", "no_done")]


# -- the checks ------------------------------------------------------------------------

GOOD = dict(no_response=0, malformed=0, p99_ms=900.0, deadline_s=20.0, gateway_alive=True, health_answered=True,
            in_flight=0)


def failed(**changes) -> list[str]:
    checks = judge_run(**{**GOOD, **changes})
    return [check.name for check in checks if not check.passed]


def test_a_clean_run_passes():
    checks = judge_run(**GOOD)
    assert failed() == [] and exit_status_of(checks) == 0
    # A gateway the soak did not start is not judged on how it stops.
    assert "gateway stops cleanly" not in [check.name for check in checks]
    assert failed(stop_status=0) == []


@pytest.mark.parametrize(
    ("changes", "failing"),
    [
        ({"malformed": 1}, "malformed is 0"),
        ({"no_response": 1}, "no response is 0"),
        ({"p99_ms": 20000.0}, "p99 below the deadline"),
        ({"p99_ms": None}, "p99 below the deadline"),
        ({"gateway_alive": False}, "gateway alive"),
        ({"health_answered": False}, "/health answers at the end"),
        ({"in_flight": 2}, "in flight returns to 0"),
        ({"in_flight": None}, "in flight returns to 0"),
        ({"stop_status": -9}, "gateway stops cleanly"),
    ],
)
def test_each_check_can_fail_the_run(changes, failing):
    assert failed(**changes) == [failing]
    assert exit_status_of(judge_run(**{**GOOD, **changes})) == 1


# -- fault mixes -----------------------------------------------------------------------


def expected_fault_rate(profile: dict, stream_fraction: float) -> float:
    probabilities = {kind: profile.get(f"{kind.value}_probability", 0.0) for kind in FaultKind}
    return soak._expected_rate(probabilities, stream_fraction)


@pytest.mark.parametrize("stream_fraction", [0.0, 0.5, 1.0])
def test_mixes_fault_at_the_rate_asked_and_the_mock_accepts_them(stream_fraction):
    rng = random.Random(5)
    for _ in range(50):
        profile = draw_profile(rng, rate=0.3, stream_fraction=stream_fraction)
        FaultProfile.from_fields(profile)  # raises on anything the mock would refuse
        assert expected_fault_rate(profile, stream_fraction) == pytest.approx(0.3, abs=1e-3)  # probabilities are rounded
        kinds = [kind for kind in FaultKind if profile.get(f"{kind.value}_probability")]
        assert 3 <= len(kinds) <= 6
        if stream_fraction == 0.0:
            assert not STREAM_ONLY & set(kinds)


def test_mixes_are_reproducible_from_the_seed_and_differ_between_draws():
    first = [draw_profile(random.Random(9), rate=0.3, stream_fraction=0.5) for _ in range(2)]
    assert first[0] == first[1]
    rng = random.Random(9)
    assert draw_profile(rng, rate=0.3, stream_fraction=0.5) != draw_profile(rng, rate=0.3, stream_fraction=0.5)


def test_mixes_draw_only_the_kinds_asked_for_and_rate_zero_is_healthy():
    rng = random.Random(1)
    profile = draw_profile(rng, rate=0.3, stream_fraction=1.0, kinds=(FaultKind.STREAM_CUT,))
    assert profile["stream_cut_probability"] == pytest.approx(0.3)
    assert set(profile) == {"seed", "stream_cut_probability", "stream_cut_after_chunks"}
    assert set(draw_profile(rng, rate=0.0, stream_fraction=0.5)) == {"seed"}


def test_options_refuse_contradictions():
    with pytest.raises(UsageError, match="--mock-url"):
        SoakOptions(gateway_url="http://127.0.0.1:1")
    with pytest.raises(UsageError, match="--faults"):
        SoakOptions(faults="timeout,bogus")
    assert SoakOptions(faults="stream_cut, timeout").faults == (FaultKind.TIMEOUT, FaultKind.STREAM_CUT)
    assert soak.main(["--fault-rate", "2"]) == 2


# -- runs --------------------------------------------------------------------------------


async def test_short_soak_through_a_started_gateway_passes_every_check(tmp_path):
    options = SoakOptions(requests=300, concurrency=32, mix_interval=1.0, seed=11, workdir=tmp_path)
    report = await run_soak(options)
    assert [check.name for check in report.checks if not check.passed] == []
    assert report.exit_status == 0
    total = report.total
    assert total.sent == total.answered == 300 and total.lost == 0
    assert report.verdicts["complete"] + report.verdicts["error"] == 300
    assert report.verdicts["complete"] > 150  # the gateway saves most requests from 30% faults
    assert 0 < total.streamed < 300
    # The mock was really misbehaving, on both personalities, mix after mix.
    assert len(report.mixes) >= 2
    upstream = report.upstream
    assert upstream.total >= total.sent
    for name, fraction in report.fault_fraction().items():
        assert fraction is not None and fraction > 0.1, name
    assert total.latency.p99 < options.deadline * 1000
    # Memory came from the gateway's own process, which stopped cleanly when asked.
    memory = report.memory
    assert memory is not None and memory.pid == report.gateway_pid
    assert 0 < memory.rss_start <= memory.peak and 0 < memory.rss_end <= memory.peak
    assert report.gateway_started and report.gateway_exit_status == 0
    assert report.cpu is not None and report.cpu > 0
    assert all(breaker.transitions is not None for breaker in report.breakers.values())
    data = orjson.loads(orjson.dumps(report.to_json()))
    assert data["passed"] is True and data["requests"]["malformed"] == 0
    assert data["gateway"]["config"] == (tmp_path / "gateway.toml").read_text()
    assert (tmp_path / "gateway.log").exists() and (tmp_path / "mock.log").exists()


async def test_the_soak_fails_a_gateway_that_cuts_streams(mock_server_url, tmp_path):
    # The bare mock as the "gateway": nothing stands between the client and its stream
    # cuts, so streams stop without [DONE] or an error event. The command must say so.
    json_path = tmp_path / "soak.json"
    argv = [sys.executable, "-m", "orchestrator.soak", "--gateway-url", mock_server_url,
            "--mock-url", mock_server_url, "--requests", "40", "--concurrency", "8", "--stream", "1",
            "--faults", "stream_cut", "--fault-rate", "0.5", "--mix-interval", "1", "--seed", "4",
            "--json", str(json_path)]
    completed = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert completed.returncode == 1, completed.stderr.decode()
    assert b"FAIL  malformed is 0" in completed.stdout
    data = orjson.loads(json_path.read_bytes())
    assert data["passed"] is False
    # Its cut streams, and (the mock being no gateway) answers without x-request-id.
    assert data["requests"]["malformed"] > 0 and set(data["malformed"]) == {"no_done", "request_id_mismatch"}
    assert data["requests"]["no_response"] == 0
    assert data["memory"] is None and data["gateway"]["started"] is False
    # Each failing request is listed by the id the gateway (here: the mock) logs.
    examples = data["examples"]
    assert 0 < len(examples) <= 20  # ten per reason at most
    assert {example["verdict"] for example in examples} == {"malformed:no_done", "malformed:request_id_mismatch"}
    assert all(example["request_id"].startswith("load-4-") and example["stream"] for example in examples)
