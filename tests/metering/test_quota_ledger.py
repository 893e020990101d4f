"""The gateway's local quota arithmetic (libs.common.quota): pure functions, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.common import quota as q
from libs.common.events.metering import QuotaLimits, QuotaState, Window

T0 = datetime(2027, 3, 14, 12, 30, 15, tzinfo=UTC)


def state(
    *,
    window: Window = "minute",
    total: int | None = 1000,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    requests: int | None = None,
    used: tuple[int, ...] = (0, 0),
    at: datetime = T0,
    revision: int = 1,
    key_id: str | None = None,
    model: str | None = None,
    quota_id: str = "q1",
    counted_through: datetime | None = None,
    by_gateway: dict[str, tuple[int, int]] | None = None,
    requests_by_gateway: dict[str, int] | None = None,
) -> QuotaState:
    """``used``: (input, output) or (input, output, requests)."""
    start, end = q.window_bounds(window, at)
    limits = QuotaLimits(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        total_tokens=total,
        requests=requests,
    )
    counts = (*used, 0)[:3]
    return QuotaState(
        quota_id=quota_id,
        project="p",
        key_id=key_id,
        model=model,
        window=window,
        limits=limits,
        soft_threshold=0.8,
        revision=revision,
        window_start=start,
        window_end=end,
        input_used=counts[0],
        output_used=counts[1],
        requests_used=counts[2],
        status=q.status_of(limits, 0.8, counts),
        as_of=at,
        counted_through=counted_through,
        by_gateway=by_gateway or {},
        requests_by_gateway=requests_by_gateway or {},
    )


@pytest.mark.parametrize(
    ("window", "at", "start", "end"),
    [
        ("minute", T0, "2027-03-14T12:30:00", "2027-03-14T12:31:00"),
        ("hour", T0, "2027-03-14T12:00:00", "2027-03-14T13:00:00"),
        ("day", T0, "2027-03-14T00:00:00", "2027-03-15T00:00:00"),
        ("month", T0, "2027-03-01T00:00:00", "2027-04-01T00:00:00"),
        (
            "month",
            datetime(2027, 12, 31, 23, 59, tzinfo=UTC),
            "2027-12-01T00:00:00",
            "2028-01-01T00:00:00",
        ),
        (
            "month",
            datetime(2028, 2, 29, 12, tzinfo=UTC),
            "2028-02-01T00:00:00",
            "2028-03-01T00:00:00",
        ),
    ],
)
def test_windows_are_aligned_utc_calendar_windows(
    window: Window, at: datetime, start: str, end: str
) -> None:
    got = q.window_bounds(window, at)
    assert got == (datetime.fromisoformat(start + "+00:00"), datetime.fromisoformat(end + "+00:00"))


def test_a_window_is_computed_in_utc_whatever_the_input_zone() -> None:
    paris = datetime(2027, 3, 15, 0, 30, tzinfo=UTC).astimezone(
        __import__("zoneinfo").ZoneInfo("Europe/Paris")
    )
    assert q.window_start("day", paris) == datetime(2027, 3, 15, tzinfo=UTC)
    with pytest.raises(ValueError, match="aware"):
        q.window_bounds("day", datetime(2027, 1, 1))


def test_thresholds_round_up_to_whole_tokens() -> None:
    limits = QuotaLimits(total_tokens=7)
    assert q.dimensions_reached(limits, (3, 2, 0), 0.8) == []
    assert q.dimensions_reached(limits, (3, 3, 0), 0.8) == ["total"]  # 80% of 7 is reached at 6
    assert q.status_of(limits, 0.8, (4, 3, 0)) == "exceeded"


def test_separate_input_output_and_total_limits() -> None:
    limits = QuotaLimits(input_tokens=100, output_tokens=10, total_tokens=1000, requests=5)
    assert q.dimensions_reached(limits, (50, 10, 0), 1.0) == ["output"]
    assert q.dimensions_reached(limits, (100, 10, 0), 1.0) == ["input", "output"]
    assert q.dimensions_reached(limits, (0, 0, 5), 1.0) == ["requests"]
    assert q.status_of(limits, 0.8, (80, 0, 0)) == "warning"
    assert q.status_of(limits, 0.8, (0, 0, 4)) == "warning"


def test_reserve_refuses_a_call_that_would_pass_the_limit_with_headers_from_the_window() -> None:
    ledger = q.QuotaLedger()
    ledger.apply(state(total=1000, used=(600, 300)))
    now = T0  # 45 s before the minute ends
    ok = ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=50, output_tokens=50, now=now
    )
    assert ok.allowed
    assert ok.headers["RateLimit-Limit"] == "1000"
    assert ok.headers["RateLimit-Remaining"] == "100"
    assert ok.headers["RateLimit-Reset"] == "45"
    assert ok.warning is not None and "90%" in ok.warning
    ledger.settle(ok, input_tokens=50, output_tokens=50, at=now)  # it used all it reserved
    refused = ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=1, output_tokens=0, now=now
    )
    assert not refused.allowed
    assert refused.retry_after_seconds == 45
    assert refused.headers["Retry-After"] == "45"
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert "total token quota of 1000 per minute reached for project p" in refused.reason


def test_settling_replaces_the_estimate_with_the_real_usage() -> None:
    ledger = q.QuotaLedger()
    ledger.apply(state(total=1000))
    r = ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=100, output_tokens=800, now=T0
    )
    assert ledger.usage("q1", T0)[:2] == (100, 800)
    ledger.settle(r, input_tokens=90, output_tokens=10, at=T0)
    assert ledger.usage("q1", T0)[:2] == (90, 10)


def test_own_calls_count_once_whether_metering_has_counted_them_or_not() -> None:
    ledger = q.QuotaLedger(gateway_id="me")
    ledger.apply(state(total=1000))
    r = ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=10, output_tokens=10, now=T0
    )
    ledger.settle(r, input_tokens=10, output_tokens=10, at=T0)
    assert ledger.usage("q1", T0)[:2] == (10, 10)  # not counted by metering yet: ours alone
    ledger.apply(state(used=(10, 10), by_gateway={"me": (10, 10)}))
    assert ledger.usage("q1", T0)[:2] == (10, 10)  # counted: still once
    # Another gateway's call, counted by metering, adds; an older read arriving late does not
    # take anything away.
    ledger.apply(state(used=(15, 15), by_gateway={"me": (10, 10), "other": (5, 5)}))
    ledger.apply(state(used=(10, 10), by_gateway={"me": (10, 10)}))
    assert ledger.usage("q1", T0)[:2] == (15, 15)
    # A ledger of no gateway (or another one) takes metering's count as it is.
    stranger = q.QuotaLedger(gateway_id="else")
    stranger.apply(state(used=(15, 15), by_gateway={"me": (10, 10), "other": (5, 5)}))
    assert stranger.usage("q1", T0)[:2] == (15, 15)


def test_a_quota_full_only_with_calls_in_flight_says_to_retry_soon() -> None:
    """Usage never frees within a window, but holds do: a refusal because of them is not told
    to wait for the window's end."""
    ledger = q.QuotaLedger(gateway_id="me")
    ledger.apply(state(window="hour", total=100))
    first = ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=10, output_tokens=60, now=T0
    )
    assert first.allowed
    second = ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=10, output_tokens=30, now=T0
    )
    assert not second.allowed
    assert second.retry_after_seconds == q.HELD_RETRY_SECONDS
    assert "held by calls in flight" in second.reason
    ledger.settle(first, input_tokens=10, output_tokens=5, at=T0)
    assert ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=10, output_tokens=30, now=T0
    ).allowed
    # Finished calls fill it: that lasts until the hour ends.
    ledger.apply(state(window="hour", total=100, used=(60, 30)))
    full = ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=10, output_tokens=30, now=T0
    )
    assert not full.allowed
    assert full.retry_after_seconds == int((datetime(2027, 3, 14, 13, tzinfo=UTC) - T0).seconds)


def test_states_merge_monotonically_whatever_the_order() -> None:
    ledger = q.QuotaLedger()
    ledger.apply(state(used=(500, 0)))
    ledger.apply(state(used=(200, 0)))  # an older count arriving late changes nothing
    assert ledger.usage("q1", T0)[:2] == (500, 0)
    ledger.apply(state(used=(0, 0), total=2000, revision=2))  # a new definition keeps the count
    assert ledger.states()[0].limits.total_tokens == 2000
    assert ledger.usage("q1", T0)[:2] == (500, 0)
    ledger.apply(state(total=10, revision=1))  # an older definition is ignored
    assert ledger.states()[0].limits.total_tokens == 2000


def test_a_new_window_starts_from_zero_without_waiting_for_metering() -> None:
    ledger = q.QuotaLedger()
    ledger.apply(state(total=100, used=(100, 0)))
    assert not ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=1, output_tokens=0, now=T0
    ).allowed
    later = T0 + timedelta(seconds=45)  # 12:31:00, the next minute
    again = ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=1, output_tokens=0, now=later
    )
    assert again.allowed
    assert again.headers["RateLimit-Remaining"] == "100"


def test_key_and_model_quotas_apply_only_to_their_calls_and_the_longest_window_says_when() -> None:
    ledger = q.QuotaLedger()
    ledger.apply(state(quota_id="key", key_id="k1", total=10, used=(10, 0)))
    ledger.apply(state(quota_id="model", model="big", window="day", total=5, used=(5, 0)))
    other_key = ledger.reserve(
        project="p", credential_id="k2", model="small", input_tokens=1, output_tokens=0, now=T0
    )
    assert other_key.allowed
    both = ledger.reserve(
        project="p", credential_id="k1", model="big", input_tokens=1, output_tokens=0, now=T0
    )
    assert not both.allowed
    # Blocked by the minute and the day: only the day's end lets the call through.
    assert both.retry_after_seconds == int((datetime(2027, 3, 15, tzinfo=UTC) - T0).total_seconds())
    assert ledger.reserve(
        project="other", credential_id="k1", model="big", input_tokens=1, output_tokens=0, now=T0
    ).allowed


def test_a_request_larger_than_the_whole_budget_says_so() -> None:
    ledger = q.QuotaLedger()
    ledger.apply(state(output_tokens=100, total=None))
    r = ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=5, output_tokens=4096, now=T0
    )
    assert not r.allowed
    assert "this request alone may use 4096 tokens" in r.reason


def test_a_snapshot_removes_quotas_that_are_gone_and_keeps_local_usage_of_the_others() -> None:
    ledger = q.QuotaLedger()
    ledger.apply(state(quota_id="a"))
    ledger.apply(state(quota_id="b"))
    r = ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=7, output_tokens=0, now=T0
    )
    ledger.replace([state(quota_id="a")])
    assert len(ledger) == 1
    assert ledger.usage("a", T0)[:2] == (7, 0)
    ledger.settle(r, input_tokens=7, output_tokens=0, at=T0)  # the hold on "b" is just dropped
    assert ledger.usage("a", T0)[:2] == (7, 0)


# -- the exact ledger, as a property -----------------------------------------------------------

LIMIT = 1000

step = st.one_of(
    st.tuples(st.just("reserve"), st.integers(0, 300), st.integers(0, 300)),
    st.tuples(st.just("settle"), st.integers(0, 10), st.floats(0, 1)),
    st.tuples(st.just("count"), st.integers(0, 10), st.booleans()),
    st.tuples(st.just("other"), st.integers(0, 200), st.integers(0, 200)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=60))
def test_one_gateway_admits_a_call_iff_it_fits_counting_every_call_once(
    steps: list[tuple[str, int, Any]],
) -> None:
    """Random calls reserve and settle (using up to what they reserved); metering counts this
    gateway's settled calls in any order and at any time, and another gateway's calls, and its
    states arrive late or twice. Whatever happens: the ledger's usage is every finished call once
    plus what calls in flight hold, a call is admitted iff it fits, and the limit is never passed
    by finished calls."""
    ledger = q.QuotaLedger(gateway_id="me")
    ledger.apply(state(window="hour", total=LIMIT))
    flying: list[tuple[q.Reservation, int]] = []  # (reservation, tokens reserved)
    settled: list[int] = []  # this gateway's finished calls, by index
    counted: set[int] = set()  # which of them metering has counted
    others = 0
    published: list[QuotaState] = []
    for kind, a, b in steps:
        held = sum(tokens for _, tokens in flying)
        mine = sum(settled)
        if kind == "reserve":
            r = ledger.reserve(
                project="p", credential_id="k", model="m", input_tokens=a, output_tokens=b, now=T0
            )
            assert r.allowed == (others + mine + held + a + b <= LIMIT), (others, mine, held, a, b)
            if r.allowed:
                flying.append((r, a + b))
            elif others + mine + a + b <= LIMIT:
                assert r.retry_after_seconds == q.HELD_RETRY_SECONDS
        elif kind == "settle" and flying:
            r, tokens = flying.pop(a % len(flying))
            used = int(tokens * b)
            ledger.settle(r, input_tokens=used, output_tokens=0, at=T0)
            settled.append(used)
        elif kind == "count":
            counted |= {i for i in range(len(settled)) if (i + a) % 2 == 0 or b}
            me = sum(settled[i] for i in counted)
            published.append(
                state(window="hour", total=LIMIT, used=(others + me, 0), by_gateway={"me": (me, 0)})
            )
            ledger.apply(published[-1])
            if published and a % 3 == 0:
                ledger.apply(published[a % len(published)])  # an old state, late
        elif kind == "other":
            others += a + b
            me = sum(settled[i] for i in counted)
            ledger.apply(
                state(window="hour", total=LIMIT, used=(others + me, 0), by_gateway={"me": (me, 0)})
            )
        held = sum(tokens for _, tokens in flying)
        assert sum(ledger.usage("q1", T0)[:2]) == others + sum(settled) + held


def test_a_state_without_the_gateway_split_never_displaces_one_with_it() -> None:
    """Alerts from an older metering carry no split: for the same count, the split wins (else
    this gateway's own calls would count twice until the next state)."""
    ledger = q.QuotaLedger(gateway_id="me")
    ledger.apply(state(total=1000))
    r = ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=300, output_tokens=0, now=T0
    )
    ledger.settle(r, input_tokens=300, output_tokens=0, at=T0)
    ledger.apply(state(total=1000, used=(300, 0), by_gateway={"me": (300, 0)}))
    ledger.apply(state(total=1000, used=(300, 0), at=T0 + timedelta(seconds=1)))
    assert ledger.usage("q1", T0)[:2] == (300, 0)


def test_a_tool_call_is_judged_by_call_limits_only_and_a_model_call_by_both() -> None:
    """A spent token budget does not stop a tool call (it asks no tokens); a spent call budget
    stops model and tool calls alike."""
    ledger = q.QuotaLedger()
    ledger.apply(state(quota_id="tokens", window="hour", total=100, used=(100, 0)))
    ledger.apply(state(quota_id="calls", window="hour", total=None, requests=2))

    def call(tokens: int, requests: int = 1) -> q.Reservation:
        return ledger.reserve(
            project="p",
            credential_id="k",
            model="m",
            input_tokens=tokens,
            output_tokens=0,
            requests=requests,
            now=T0,
        )

    assert not call(1).allowed  # tokens spent
    tool = call(0)
    assert tool.allowed
    assert tool.headers["RateLimit-Limit"] == "2"  # the call limit is the one that applies
    ledger.settle(tool, input_tokens=0, output_tokens=0, at=T0)
    assert ledger.usage("calls", T0) == (0, 0, 1)
    batch = call(0, requests=2)  # two tool calls in one JSON-RPC batch: one is left
    assert not batch.allowed
    assert "call quota of 2 per hour reached for project p" in batch.reason
    ledger.apply(state(quota_id="tokens", window="hour", total=1000, revision=2))  # raised
    last = call(0)
    assert last.allowed
    ledger.settle(last, input_tokens=0, output_tokens=0, at=T0)
    refused = call(5)  # a model call: the token budget would hold it, the call budget not
    assert not refused.allowed
    assert "call quota" in refused.reason


def test_a_call_refused_on_settle_counts_no_call() -> None:
    """What a caller settles is what its usage event tells metering: ``requests=0`` when it
    records no admitted call (a Kong route, whose usage comes from elsewhere)."""
    ledger = q.QuotaLedger()
    ledger.apply(state(window="hour", total=None, requests=5))
    r = ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=1, output_tokens=0, now=T0
    )
    assert ledger.usage("q1", T0) == (1, 0, 1)  # held while in flight
    ledger.settle(r, input_tokens=0, output_tokens=0, requests=0, at=T0)
    assert ledger.usage("q1", T0) == (0, 0, 0)


def test_the_soft_warning_names_a_call_budget_as_such() -> None:
    ledger = q.QuotaLedger()
    ledger.apply(state(window="day", total=None, requests=10, used=(0, 0, 8)))
    r = ledger.reserve(
        project="p", credential_id="k", model="m", input_tokens=0, output_tokens=0, now=T0
    )
    assert r.warning == "project p has used 80% of its day call budget"
