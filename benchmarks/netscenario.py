"""A labelled network scenario for window features: Zeek conn-like records where each attack event looks normal.

`scenario(hosts, seconds, seed)` returns a frame ordered by `ts` with the Zeek `conn.log` fields
`ts`, `uid`, `id.orig_h`, `id.orig_p`, `id.resp_h`, `id.resp_p`, `proto`, `service`, `duration`,
`orig_bytes`, `resp_bytes`, `conn_state`, `orig_pkts`, `resp_pkts`, plus `label` ("normal" or the attack)
and `attack_id` (which attack instance, -1 for normal traffic).

Normal traffic: every host opens connections as a Poisson process with its own rate (log-normal across
hosts: most hosts a connection every 10-60 s, a few busy ones several a second). Each connection is drawn
from a mix of kinds (web, DNS, mail, SSH sessions) with log-normal durations and byte counts, and the
background every real network has: 10 % of connections are rejected (`REJ`, zero bytes, a port drawn from
1-1024: stale service lists, misconfigured clients), 5 % get no answer (`S0`, to port 80 or 443), and 5 %
are short failed SSH logins (`SF`, a few hundred bytes each way).

Attacks, in the second half of the time range (the first half is for training), each made only of events
drawn from those same normal kinds, so no single event is unusual:
- port scan: one host, 300-500 `REJ` connections to distinct ports 1-1024 of one target within 2-4 s;
- flood: one host, 1,000 `S0` connections to port 80 of one target within 5 s;
- brute force: one host, 60-100 failed SSH logins to one server within 30-60 s.
What gives them away is only their number per source host in a short time: a per-entity window.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

START = 1_700_000_000.0  # 2023-11-14T22:13:20Z
FIELDS = ("ts", "uid", "id.orig_h", "id.orig_p", "id.resp_h", "id.resp_p", "proto", "service", "duration",
          "orig_bytes", "resp_bytes", "conn_state", "orig_pkts", "resp_pkts")
#: Normal kinds: (share, proto, service, port, conn_state, log-means of duration (s), orig bytes and resp bytes)
KINDS = (
    (0.40, "tcp", "http", 80, "SF", -0.5, 6.0, 9.0),
    (0.15, "tcp", "ssl", 443, "SF", 0.5, 7.0, 9.5),
    (0.12, "udp", "dns", 53, "SF", -4.0, 3.8, 4.8),
    (0.05, "tcp", "smtp", 25, "SF", 0.0, 8.0, 5.5),
    (0.03, "tcp", "ssh", 22, "SF", 3.0, 8.0, 9.0),  # a working SSH session
    (0.10, "tcp", "-", 0, "REJ", -7.0, 0.0, 0.0),  # rejected: zero bytes, a port of 1-1024
    (0.05, "tcp", "-", 80, "S0", 1.0, 0.0, 0.0),  # no answer (port 80 or 443)
    (0.10, "udp", "-", 123, "SF", -5.0, 3.9, 3.9),  # NTP and other small datagrams
)
FAILED_SSH_SHARE = 0.05  # short failed SSH logins among normal connections
KIND_REJ, KIND_S0, KIND_FAILED_SSH = 5, 6, len(KINDS)
SERVERS = 50
CLIENTS, SERVER_NET = 1, 200


def _ip(net: int, n: np.ndarray) -> list[str]:
    """Addresses 10.<net+>.x.y for host numbers n (62,500 per /16)."""
    return [f"10.{net + i // 62_500}.{i // 250 % 250}.{i % 250 + 1}" for i in n.tolist()]


def _events(rng: np.random.Generator, kinds: np.ndarray) -> dict[str, np.ndarray]:
    """Connection fields for events of the given kinds (index into KINDS, or KIND_FAILED_SSH)."""
    n = kinds.size
    table = (*KINDS, (0.0, "tcp", "ssh", 22, "SF", -0.7, 5.8, 6.3))
    proto = np.array([table[k][1] for k in kinds.tolist()], dtype=object)
    service = np.array([table[k][2] for k in kinds.tolist()], dtype=object)
    port = np.array([table[k][3] for k in kinds.tolist()], dtype=np.int64)
    state = np.array([table[k][4] for k in kinds.tolist()], dtype=object)
    mu = np.array([[table[k][5], table[k][6], table[k][7]] for k in kinds.tolist()]).reshape(n, 3)
    duration = np.exp(mu[:, 0] + 0.6 * rng.standard_normal(n))
    orig = np.where(mu[:, 1] > 0, np.round(np.exp(mu[:, 1] + 0.5 * rng.standard_normal(n))), 0.0)
    resp = np.where(mu[:, 2] > 0, np.round(np.exp(mu[:, 2] + 0.7 * rng.standard_normal(n))), 0.0)
    rej = kinds == KIND_REJ
    port[rej] = rng.integers(1, 1025, int(rej.sum()))
    s0 = kinds == KIND_S0
    port[s0] = np.where(rng.random(int(s0.sum())) < 0.5, 80, 443)
    duration[rej] = 0.0
    orig_pkts = np.where(rej | s0, np.where(s0, 2, 1), np.maximum(1, np.round(orig / 500) + rng.integers(1, 4, n)))
    resp_pkts = np.where(rej, 1, np.where(s0, 0, np.maximum(1, np.round(resp / 1000) + rng.integers(1, 4, n))))
    return {"id.resp_p": port, "proto": proto, "service": service, "duration": np.round(duration, 6),
            "orig_bytes": orig, "resp_bytes": resp, "conn_state": state,
            "orig_pkts": orig_pkts.astype(np.int64), "resp_pkts": resp_pkts.astype(np.int64)}


def normal_traffic(rng: np.random.Generator, hosts: int, seconds: float, start: float = START) -> pd.DataFrame:
    """Poisson connections from `hosts` hosts over `seconds`, kinds drawn from the normal mix."""
    mean_gap = np.exp(rng.normal(np.log(25.0), 0.8, hosts))  # seconds between a host's connections
    per_host = rng.poisson(seconds / mean_gap)
    host = np.repeat(np.arange(hosts), per_host)
    ts = start + rng.random(host.size) * seconds
    shares = np.array([k[0] for k in KINDS] + [FAILED_SSH_SHARE])
    kinds = rng.choice(shares.size, size=host.size, p=shares / shares.sum())
    frame = pd.DataFrame({"ts": ts, "id.orig_h": _ip(CLIENTS, host),
                          "id.resp_h": _ip(SERVER_NET, rng.integers(0, SERVERS, host.size)), **_events(rng, kinds)})
    frame["label"], frame["attack_id"] = "normal", -1
    return frame


def _attack(rng: np.random.Generator, name: str, attack_id: int, source: int, target: int, start: float,
            n: int, span: float, kind: int) -> pd.DataFrame:
    fields = _events(rng, np.full(n, kind))
    if name == "portscan":
        fields["id.resp_p"] = rng.permutation(np.arange(1, 1025))[:n]
    if name == "flood":
        fields["id.resp_p"] = np.full(n, 80)
    frame = pd.DataFrame({"ts": start + np.sort(rng.random(n)) * span, "id.orig_h": _ip(CLIENTS, np.full(n, source)),
                          "id.resp_h": _ip(SERVER_NET, np.full(n, target)), **fields})
    frame["label"], frame["attack_id"] = name, attack_id
    return frame


def attacks(rng: np.random.Generator, hosts: int, seconds: float, start: float = START) -> pd.DataFrame:
    """3 port scans, 2 floods, 3 brute forces from ordinary hosts, at random times in the second half."""
    plan = [("portscan", KIND_REJ, (300, 501), (2.0, 4.0))] * 3 + [("flood", KIND_S0, (1000, 1001), (5.0, 5.0))] * 2 \
        + [("bruteforce", KIND_FAILED_SSH, (60, 101), (30.0, 60.0))] * 3
    sources = rng.choice(hosts, size=len(plan), replace=False)
    parts = []
    for i, (name, kind, (low, high), (short, long)) in enumerate(plan):
        at = start + seconds * (0.5 + 0.45 * rng.random())
        parts.append(_attack(rng, name, i, int(sources[i]), int(rng.integers(0, SERVERS)), at,
                             int(rng.integers(low, high)), float(rng.uniform(short, long)), kind))
    return pd.concat(parts, ignore_index=True)


def scenario(hosts: int = 500, seconds: float = 3600.0, seed: int = 0, with_attacks: bool = True) -> pd.DataFrame:
    """Normal traffic of `hosts` hosts over `seconds` plus (by default) the attacks, ordered by `ts`."""
    rng = np.random.default_rng(seed)
    parts = [normal_traffic(rng, hosts, seconds)]
    if with_attacks:
        parts.append(attacks(rng, hosts, seconds))
    frame = pd.concat(parts, ignore_index=True).sort_values("ts", kind="stable", ignore_index=True)
    frame["ts"] = frame["ts"].round(6)
    frame["id.orig_p"] = rng.integers(1024, 65536, len(frame))
    frame["uid"] = [f"C{seed:02d}{i:09d}" for i in range(len(frame))]
    return frame[[*FIELDS, "label", "attack_id"]]


def entity_events(entities: int, per_entity: int, seconds: float, seed: int = 0) -> pd.DataFrame:
    """`entities` hosts with exactly `per_entity` normal connections each, spread over `seconds` (memory tests)."""
    rng = np.random.default_rng(seed)
    host = np.repeat(np.arange(entities), per_entity)
    shares = np.array([k[0] for k in KINDS] + [FAILED_SSH_SHARE])
    kinds = rng.choice(shares.size, size=host.size, p=shares / shares.sum())
    frame = pd.DataFrame({"ts": START + rng.random(host.size) * seconds, "id.orig_h": _ip(CLIENTS, host),
                          "id.resp_h": _ip(SERVER_NET, rng.integers(0, SERVERS, host.size)), **_events(rng, kinds)})
    frame = frame.sort_values("ts", kind="stable", ignore_index=True)
    frame["ts"] = frame["ts"].round(6)
    return frame
