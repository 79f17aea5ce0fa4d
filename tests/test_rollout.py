"""Replicas behind a balancer: three servers on loopback, 64 callers through KilnClient's
round-robin channel, one replica SIGTERMed mid-load and started again. Every request is answered,
none fails, and the replicas together answered exactly as many requests as were sent (a retry runs
only what a draining replica refused, never one it accepted)."""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
from kiln.runtime.client import KilnClient, channel_target
from servers import free_port, metric, running_server

TEXTS = ["Alice lives in Seoul.", "The central bank raised rates.", "한국은행이 금리를 올렸다."]


def _answered(process) -> int:
    """What a stopped replica says it answered (its last log line)."""
    lines = [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
    return next(line["answered"] for line in lines if line["msg"] == "stopped")


def test_rolling_restart_loses_and_repeats_nothing(exported):
    package = {"cls": exported("bert", "text-classification")}
    flags = ("--log-format", "json", "--grace", "10", "--max-queue-delay-ms", "5")
    ports = [(free_port(), free_port(), free_port()) for _ in range(3)]
    with (
        running_server(*flags, models=package, ports=ports[0]) as first,
        running_server(*flags, models=package, ports=ports[1]) as second,
        running_server(*flags, models=package, ports=ports[2]) as third,
        KilnClient([first.address, second.address, third.address]) as client,
    ):
        stop, lock = threading.Event(), threading.Lock()
        sent, failures = [0], []

        def caller() -> None:
            while not stop.is_set():
                try:
                    assert len(client.classify("cls", TEXTS[:1])) == 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                with lock:
                    sent[0] += 1

        threads = [threading.Thread(target=caller) for _ in range(64)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        second.process.send_signal(signal.SIGTERM)  # a rolling update takes this replica down...
        assert second.process.wait(timeout=30) == 0
        with running_server(*flags, models=package, ports=ports[1]) as restarted:  # ...and brings it back
            deadline = time.monotonic() + 20  # the client reconnects after its backoff, then sends there too
            while metric(restarted.metrics_url, "kiln_requests_total", code="OK") < 50 and time.monotonic() < deadline:
                time.sleep(0.2)
            stop.set()
            for thread in threads:
                thread.join()
        answered = [_answered(second.process), _answered(restarted.process)]
    answered += [_answered(first.process), _answered(third.process)]
    assert failures == [], failures[:3]
    assert sent[0] > 100 and sum(answered) == sent[0], (sent[0], answered)
    assert all(count > 0 for count in answered)  # every replica took traffic, the restarted one too


def test_channel_targets():
    assert channel_target("dns:///kiln-headless:8001") == "dns:///kiln-headless:8001"
    assert channel_target(["10.0.0.1:8001", "10.0.0.2:8001"]) == "ipv4:10.0.0.1:8001,10.0.0.2:8001"
    assert channel_target(["[::1]:8001", "[::2]:8001"]) == "ipv6:[::1]:8001,[::2]:8001"
