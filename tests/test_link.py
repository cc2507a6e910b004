"""The front end ⇄ engine core link over real ZeroMQ sockets on loopback: a burst of outputs
arrives whole and in order (nothing dropped at a high-water mark); a peer without the secret,
or bytes that are no message, are ignored."""
import threading

import zmq

from server import link


def test_a_burst_of_token_outputs_arrives_whole_and_in_order():
    n, got, done = 20_000, [], threading.Event()

    def on_message(_peer, msg):
        got.append(msg.token_ids[0])
        if len(got) == n:
            done.set()

    front, address = link.bind("127.0.0.1", 0, on_message, "test-front")
    core = link.connect(address, lambda msg: None, "test-core")
    try:
        for i in range(n):  # far past ZeroMQ's default high-water mark of 1000 queued messages
            core.send(link.TokenOutput(f"r{i % 7}", [i]))
        assert done.wait(60), f"{len(got)} of {n} arrived"
        assert got == list(range(n))
    finally:
        core.close()
        front.close()


def test_malformed_bytes_on_the_link_are_ignored():
    got, done = [], threading.Event()

    def on_message(_peer, msg):
        got.append(msg)
        done.set()

    front, address = link.bind("127.0.0.1", 0, on_message, "test-front")
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.connect(address)
    core = link.connect(address, lambda msg: None, "test-core")
    try:
        raw.send(b"\x93not a message")
        core.send(link.Heartbeat(1, 2, 3, 4, False))
        assert done.wait(30)
        assert got == [link.Heartbeat(1, 2, 3, 4, False)]
    finally:
        raw.close(linger=0)
        core.close()
        front.close()
