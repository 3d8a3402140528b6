"""Six faults on a real 3-node cluster under a steady load, each judged by the history checker.

Every case runs once per delivery mode (`at-least-once`, `exactly-once`): events keep arriving while
the fault happens; afterwards the group must have committed the end offsets, and the history must show
zero lost records (and, exactly-once, zero duplicates; at-least-once, duplicates that share their ids).
Each case prints its figures: events, lost, duplicated, recovery times, readiness during the fault.
Cases 1 and 6 run in the default `pytest` run (CI); the rest (`faults_full`) with `--all-faults`.
Waits are conditions with deadlines (a leader moving, the group's assignment changing, commits
advancing), never sleeps. See docs/faults.md.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.harness import Scenario
from tests.faults.history import EXACTLY_ONCE
from tests.kafka_broker import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]

#: The broker the topic-hurting cases aim at: it leads every input, alert and dead-letter partition.
VICTIM = 2


ALL_PARTITIONS = [{0, 1, 2}]


def test_worker_sigkilled_three_times_mid_stream(scenario: Scenario) -> None:
    s = scenario
    s.create_topics()
    worker = s.start_worker("w0")
    s.start_load()
    s.wait_progress()
    for i in range(1, 4):
        with s.fault(f"SIGKILL worker #{i}"):
            s.kill_worker(worker)
            worker = s.start_worker("w0")  # same client and transactional id
    s.finish()


@pytest.mark.faults_full
def test_leader_broker_sigkilled_mid_stream_then_restarted(scenario: Scenario) -> None:
    s = scenario
    s.create_topics(leader=VICTIM)
    s.start_worker("w0")
    s.start_load()
    s.wait_progress()
    s.note_coordinators()
    with s.fault(f"SIGKILL broker {VICTIM} (leader of every input, alert and dead-letter partition)"):
        killed_at = time.monotonic()
        s.cluster.kill(VICTIM)
        s.timed("new leaders elected", lambda: s.led_without(VICTIM), since=killed_at)
    restarted_at = time.monotonic()
    s.cluster.restart(VICTIM)
    s.timed(f"broker {VICTIM} restarted and back in every ISR", lambda: s.in_sync(VICTIM), since=restarted_at)
    s.finish()


@pytest.mark.faults_full
def test_leader_broker_sigstopped_past_its_session_then_continued(scenario: Scenario) -> None:
    s = scenario
    s.create_topics(leader=VICTIM)
    s.start_worker("w0")
    s.start_load()
    s.wait_progress()
    s.note_coordinators()
    with s.fault(f"SIGSTOP broker {VICTIM} (leader of every input, alert and dead-letter partition)"):
        stopped_at = time.monotonic()
        s.cluster.pause(VICTIM)
        # The controller moves leadership only once the broker's session has expired: the grey failure bit.
        s.timed("broker fenced: leaders moved away from it", lambda: s.led_without(VICTIM), since=stopped_at)
    continued_at = time.monotonic()
    s.cluster.resume(VICTIM)
    s.timed(f"broker {VICTIM} continued and back in every ISR", lambda: s.in_sync(VICTIM), since=continued_at)
    s.finish()


@pytest.mark.faults_full
def test_coordinator_broker_sigkilled_mid_transaction(scenario: Scenario) -> None:
    """Exactly-once: the transaction coordinator, while a transaction is open. At-least-once has no
    transactions; its counterpart is the group coordinator, which holds the committed offsets."""
    s = scenario
    s.create_topics()
    s.start_worker("w0")
    s.start_load()
    s.wait_progress()
    if s.delivery == EXACTLY_ONCE:
        txn = s.transactional_id("w0")
        coordinator, state = wait_for(lambda: _ongoing(s, txn), 60, f"an ongoing transaction of {txn}",
                                      interval=0.05)
        what = f"transaction coordinator (broker {coordinator}, transaction {state})"

        def moved() -> bool:
            found = s.cluster.transaction(txn)
            return found is not None and found[0] != coordinator
    else:
        coordinator = wait_for(lambda: s.cluster.group_coordinator(s.topics.group), 60, "the group coordinator")
        what = f"group coordinator (broker {coordinator})"

        def moved() -> bool:
            return s.cluster.group_coordinator(s.topics.group) not in (None, coordinator)
    s.figures.notes.append(f"input partition leaders at the kill: {s.cluster.leaders(s.topics.input)}")
    with s.fault(f"SIGKILL {what}"):
        killed_at = time.monotonic()
        s.cluster.kill(coordinator)
        s.timed("a new coordinator answers", moved, since=killed_at)
    restarted_at = time.monotonic()
    s.cluster.restart(coordinator)
    s.timed(f"broker {coordinator} restarted and back in every ISR", lambda: s.in_sync(coordinator),
            since=restarted_at)
    s.finish()


def _ongoing(s: Scenario, transactional_id: str) -> tuple[int, str] | None:
    found = s.cluster.transaction(transactional_id)
    return found if found is not None and found[1] == "Ongoing" else None


@pytest.mark.faults_full
def test_one_of_two_workers_sigkilled_the_other_takes_over(scenario: Scenario) -> None:
    s = scenario
    s.create_topics()
    s.start_worker("w0")
    doomed = s.start_worker("w1")
    s.start_load()
    s.timed("two members, each with partitions", lambda: _two_members(s))
    s.wait_progress()
    with s.fault("SIGKILL one of two workers"):
        killed_at = time.monotonic()
        s.kill_worker(doomed)
        s.timed("the survivor holds all 3 partitions", lambda: s.members() == ALL_PARTITIONS, since=killed_at)
    s.finish()


def test_paused_worker_loses_its_partitions_and_is_fenced_when_continued(scenario: Scenario) -> None:
    s = scenario
    s.create_topics()
    s.start_worker("w0")
    zombie = s.start_worker("w1")
    s.start_load()
    s.timed("two members, each with partitions", lambda: _two_members(s))
    s.wait_progress()
    with s.fault("SIGSTOP one of two workers"):
        stopped_at = time.monotonic()
        s.pause_worker(zombie)
        s.timed("its partitions moved to the other worker", lambda: s.members() == ALL_PARTITIONS,
                since=stopped_at)
    continued_at = time.monotonic()
    s.resume_worker(zombie)  # it wakes up believing it still owns its partitions
    # Exactly-once, paused inside a transaction: the other worker could go on only once the broker had
    # aborted that transaction (its timeout), bumping the producer epoch; the zombie's next transactional
    # call then fails as fenced. It must neither publish nor die: it replaces its producer and rejoins.
    s.timed("the continued worker rejoined with partitions", lambda: _two_members(s), since=continued_at)
    assert zombie.proc.poll() is None, f"the continued worker exited with {zombie.proc.returncode}"
    if "replacing the transactional producer" in zombie.output():
        s.figures.notes.append("the continued worker was fenced inside a transaction and replaced its producer")
    s.finish()


def _two_members(s: Scenario) -> bool:
    members = s.members()
    return members is not None and len(members) == 2 and all(members)
