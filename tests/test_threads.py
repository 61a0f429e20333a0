"""--threads 0: the cores free at start (kvkd.threads), hand-computed cases."""

import pytest

from kvkd.threads import auto_threads, resolve_threads


@pytest.mark.parametrize("cores,load,expected", [
    (2, 0.0, 2), (2, 0.4, 2),     # quiet: every core
    (2, 0.6, 1), (2, 1.4, 1),     # one core busy elsewhere: one thread, no partner to spin for
    (2, 9.0, 1),                  # oversubscribed: still at least one
    (16, 3.4, 13), (16, 3.6, 12),
    (1, 0.0, 1), (4, -1.0, 4),    # a negative load (never reported) cannot ask for more than the cores
])
def test_auto_threads_is_cores_minus_rounded_load_at_least_one(cores, load, expected):
    assert auto_threads(cores, load) == expected


def test_resolve_threads_keeps_an_explicit_count_and_refuses_a_negative_one(monkeypatch):
    assert resolve_threads(3) == (3, "3 (--threads)")
    monkeypatch.setattr("os.getloadavg", lambda: (1.2, 0.0, 0.0))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    n, why = resolve_threads(0)
    assert n == 3 and why.startswith("3 of 4 cores (load average 1.2")
    with pytest.raises(ValueError, match="--threads must be 0"):
        resolve_threads(-2)
