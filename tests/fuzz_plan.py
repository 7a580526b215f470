"""The fuzz plan (tests/test_fuzz.py): every malformed job, every malformed runner event and
the valid jobs between them, from one seeded RNG (``KTRDR_FUZZ_SEED``)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.protocol import (
    OPS_BUCKET,
    op_subject,
)

SEED = int(os.environ.get("KTRDR_FUZZ_SEED", "20260612"))
MALFORMED_JOBS = 10_000
RUNNER_EVENTS = 1_000
VALID_JOBS = 50
SUBMITTER = "fuzzer"
VALID_PREFIX = "fz-ok-"
#: The most a malformed payload carries (nats-server's max_payload is 1 MiB).
HUGE = 900_000
#: How much the dispatcher's resident memory may grow from the warm sample (after its
#: first 1,000 job messages: imports, connections, buffers in place) to the end. Messages
#: must cost nothing that stays; op records do: every ``lease_s / 2`` the dispatcher's
#: sweep reads every record in the bucket (measured: about 1.5-3 KiB of RSS per record,
#: and each rejected job with a usable id leaves one), so the bound is a fixed slack plus
#: 3 KiB per record. Keeping the payloads (~90 MB) or 2 KiB per message would exceed it.
RSS_SLACK = 16 * 1024 * 1024
RSS_PER_RECORD = 3 * 1024
#: The whole fuzz run, well inside pytest's own timeout (this one still cleans up).
FUZZ_DEADLINE_S = 200


# -- the plan: every message, from one seeded RNG ------------------------------------------


@dataclass
class Message:
    """One publish of the fuzz run, in plan order."""

    who: str  # "submitter", or the runner credential's op id
    subject: str
    data: bytes
    category: str
    msg_id: str | None = None
    #: A valid op this message reuses the id of: sent once that op's record exists (a
    #: message processed before the valid job would legitimately take the id first).
    target: str = ""
    #: False: outside the credential's permissions; the server must refuse it.
    allowed: bool = True


def valid_job(i: int) -> dict[str, Any]:
    return {
        "job_id": f"{VALID_PREFIX}{i:03d}",
        "kind": "probe",
        "params": {"hold_s": (0.0, 0.1, 0.2)[i % 3]},
        "resources": {"cpus": (0.1, 0.25)[i % 2], "memory_gb": 0.125},
        "timeout_s": 120,
        "labels": {"fuzz": "valid", "n": str(i)},
        "submitted_by": "mallory",  # the subject's name wins: recorded as "fuzzer"
    }


class Plan:
    """The fuzz traffic. Every malformed job is one admission (or placement) rejects."""

    def __init__(self, seed: int, data_root: Path) -> None:
        self.rng = random.Random(seed)
        self.root = data_root
        self.serial = 0
        self.valid = [valid_job(i) for i in range(VALID_JOBS)]
        self.valid_ids = [job["job_id"] for job in self.valid]
        #: Runner credentials: a made-up op, ids that merely look like valid ones, and
        #: (for garbage only) a few valid ops' own.
        self.ghosts = ["fz-ghost", f"{VALID_PREFIX}0", f"{VALID_PREFIX}0000", "FZ-OK-001"]
        self.own_runners = [self.valid_ids[i] for i in (3, 17, 31, 44)]
        self.messages = self._build()

    # -- helpers ------------------------------------------------------------------------

    def bad_id(self) -> str:
        self.serial += 1
        return f"fz-bad-{self.serial:05d}"

    def base(self, job_id: str | None = None, kind: str = "probe") -> dict[str, Any]:
        return {
            "job_id": job_id or self.bad_id(),
            "kind": kind,
            "params": {"hold_s": 0} if kind == "probe" else {"strategy": "sma_cross", "symbol": "DEMO"},
            "resources": {"cpus": 0.1, "memory_gb": 0.125},
            "timeout_s": 60,
        }

    def junk(self, depth: int = 0) -> Any:
        rng = self.rng
        choice = rng.randrange(9 if depth < 3 else 6)
        if choice == 0:
            return rng.randrange(-(2**63), 2**63)
        if choice == 1:
            return rng.choice([1e308, -1e308, 5e-324, 0.0, -0.0, 3.14])
        if choice == 2:
            return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(0, 40)))
        if choice == 3:
            return rng.choice([None, True, False])
        if choice == 4:
            return rng.choice(["../../etc/passwd", "/etc", "~", "C:\\Windows", "${HOME}", "$(id)"])
        if choice == 5:
            return ""
        if choice == 6:
            return [self.junk(depth + 1) for _ in range(rng.randrange(0, 5))]
        return {str(self.junk(depth + 1))[:20]: self.junk(depth + 1) for _ in range(rng.randrange(0, 5))}

    def huge_string(self) -> str:
        """Up to HUGE bytes once JSON-encoded (a control character takes six)."""
        char = self.rng.choice("xé/.\x01")
        width = len(json.dumps(char, ensure_ascii=False).encode()) - 2
        return char * (self.rng.randrange(10_000, HUGE) // width)

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode(
            "utf-8", "surrogatepass"
        )

    def job_subject(self, kind: str) -> str:
        return f"ktrdr.jobs.{kind}.{SUBMITTER}"

    def msg_id(self) -> str | None:
        roll = self.rng.random()
        if roll < 0.4:
            return None
        if roll < 0.8:
            return f"fz-msg-{self.rng.getrandbits(48):012x}"
        return "".join(chr(self.rng.randrange(33, 127)) for _ in range(self.rng.randrange(1, 60)))

    # -- malformed jobs, by category ------------------------------------------------------

    def random_bytes(self) -> tuple[str, bytes]:
        size = self.rng.choice([0, 1, 2, 16, 300, 4096, self.rng.randrange(1, 65536)])
        data = self.rng.randbytes(size)
        if data[:1] in (b"{", b"[", b'"', b" ", b"\t", b"\n", b"\r") or data[:1].isdigit():
            data = b"\xff" + data[1:]  # never JSON, whatever follows
        return self.rng.choice(["probe", "backtest", "train", "sweep", "nosuch"]), data

    def broken_json(self) -> tuple[str, bytes]:
        text = self.dumps(self.base())
        rng = self.rng
        how = rng.randrange(8)
        if how == 0:
            return "probe", text[: rng.randrange(0, len(text))]  # truncated
        if how == 1:
            return "probe", text + rng.choice([b"}", b",", b"x", b"\x00", b"{}"])
        if how == 2:
            return "probe", text.replace(b'"', b"'")
        if how == 3:
            return "probe", text.replace(b"60", b"NaN")
        if how == 4:
            return "probe", b"\xef\xbb\xbf" + text  # a byte-order mark
        if how == 5:
            return "probe", text.replace(b"}", b",}", 1)
        if how == 6:
            return "probe", text.replace(b'"probe"', b'"pr\xffobe"')  # not UTF-8
        return "probe", text.replace(b'"job_id"', b'"job_id\\ud800"')

    def not_an_object(self) -> tuple[str, bytes]:
        value = self.rng.choice(
            [[], [self.base()], 42, -1.5e308, '"probe"', None, True, "x" * 100, 10**400, {"a": 1}]
        )
        if isinstance(value, dict):  # an object, but nothing of a job in it
            return "probe", self.dumps(value)
        if value == 10**400:
            return "probe", b"1" + b"0" * 400
        return "probe", self.dumps(value)

    WRONG_TYPES: tuple[tuple[tuple[str, ...], Any], ...] = (
        (("job_id",), 123),
        (("job_id",), None),
        (("job_id",), ["fz"]),
        (("kind",), 7),
        (("kind",), None),
        (("params",), []),
        (("params",), "hold_s=1"),
        (("params",), None),
        (("params", "hold_s"), "1"),
        (("params", "hold_s"), [1]),
        (("params", "hold_s"), True),
        (("params", "fail"), "yes"),
        (("params", "exit_code"), 1.5),
        (("resources",), "big"),
        (("resources",), [1]),
        (("resources", "cpus"), "1"),
        (("resources", "cpus"), -1),
        (("resources", "cpus"), 0),
        (("resources", "memory_gb"), {}),
        (("resources", "gpus"), 1.5),
        (("resources", "gpu"), "sometimes"),
        (("timeout_s",), "10"),
        (("timeout_s",), 0),
        (("timeout_s",), -5),
        (("labels",), ["a"]),
        (("labels",), {"a": 1}),
        (("labels",), {"a": None}),
        (("submitted_by",), 5),
        (("data_dir",), 0),
        (("data_dir",), ["/etc"]),
        (("parent_id",), "../up"),
        (("parent_id",), 9),
    )

    def wrong_type(self) -> tuple[str, bytes]:
        job = self.base()
        path, value = self.rng.choice(self.WRONG_TYPES)
        target = job
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return "probe", self.dumps(job)

    def huge_value(self) -> tuple[str, bytes]:
        job = self.base()
        how = self.rng.randrange(9)
        if how == 0:
            job["resources"]["cpus"] = 1e308
        elif how == 1:
            job["resources"]["memory_gb"] = 1e300
        elif how == 2:
            return "probe", self.dumps(job).replace(b'"cpus":0.1', b'"gpus":' + b"9" * 4000)
        elif how == 3:
            job["timeout_s"] = self.rng.choice([-1e308, 1e19, 1e300])
        elif how == 4:
            job["params"]["hold_s"] = 1e308
        elif how == 5:
            job["params"]["allocate_mb"] = 2**62
        elif how == 6:
            job["job_id"] = "fz" + "9" * self.rng.randrange(80, HUGE // 2)
        elif how == 7:
            job["params"]["junk"] = self.huge_string()  # an unknown param, and a big one
        else:
            job["labels"] = {f"k{i}": i for i in range(self.rng.randrange(1, 20_000))}  # not strings
        return "probe", self.dumps(job)

    JUNK_IDS = (
        "",
        " ",
        "-x",
        "_x",
        ".",
        "..",
        "../../etc/passwd",
        "a/b",
        "fz.bad",
        "fz bad",
        "fz*",
        ">",
        "*",
        "$KV",
        "x" * 81,
        "fzé",
        "fz-\u202eevil",
        "\x00",
        "fz\x00bad",
        "fz\x1b[31m",
        "fz\r\nPUB ktrdr.jobs.probe 2\r\n{}",
        "fz\t",
        "\uff10\uff11",
        "fz\ud800",
    )

    def bad_job_id(self) -> tuple[str, bytes]:
        job = self.base()
        if self.rng.random() < 0.15:
            # a trailing newline: re's "$" matches before it
            job["job_id"] = f"{self.bad_id()}\n"
        else:
            job["job_id"] = self.rng.choice(self.JUNK_IDS)
        return "probe", self.dumps(job)

    def path_like(self) -> tuple[str, bytes]:
        root = self.root
        dirs = [
            "../../etc",
            "/etc",
            "/",
            "relative/dir",
            "~",
            "~root",
            f"{root}/../..",
            f"{root}/escape",  # a link out of the root
            f"{root}/escape/..",
            f"{root}/nope",
            f"{root}/private",  # not readable by the container user
            f"{root}/file.csv",  # not a directory
            f"{root}/loop",  # a link to itself
            "~nosuchuser-fz/data",  # the home of a user that does not exist
            f"{root}/x\x00y",
            "\x00",
            "/proc/self/root",
            "/dev/null",
            "//etc",
            "/tmp/../etc",
            "file:///etc",
            "C:\\Windows",
            "${HOME}",
        ]
        rng = self.rng
        if rng.random() < 0.5:
            job = self.base(kind=rng.choice(["probe", "backtest"]))
            job["data_dir"] = rng.choice(dirs)
            return job["kind"], self.dumps(job)
        job = self.base(kind="backtest")
        field_name, value = rng.choice(
            [
                ("symbol", "../../etc/passwd"),
                ("symbol", "/etc/passwd"),
                ("symbol", ".."),
                ("symbol", "AAPL/../../x"),
                ("symbol", "a\x00"),
                ("symbol", "NOPE"),  # no data directory mounted
                ("symbol", "DEMO\n"),
                ("strategy", "../sma_cross"),
                ("strategy", "os.system"),
                ("strategy", "__import__"),
                ("strategy", "sma_cross\n"),
                ("strategy", "nosuch"),
                ("timeframe", "../1d"),
                ("timeframe", "1d/../../x"),
            ]
        )
        job["params"][field_name] = value
        if field_name != "symbol":
            job["params"]["symbol"] = "NOPE"  # and no data: never runnable
        return "backtest", self.dumps(job)

    def unknown_field(self) -> tuple[str, bytes]:
        job = self.base()
        where = self.rng.randrange(3)
        key = self.rng.choice(["timeout", "cpu", "__proto__", "éé", "", "job_id ", "x" * 300])
        if where == 0:
            job[key] = self.junk()
        elif where == 1:
            job["resources"][key] = 1
        else:
            job["params"][key] = self.junk()
        return "probe", self.dumps(job)

    def nested(self) -> tuple[str, bytes]:
        depth = self.rng.choice([50, 500, 2_000, 20_000, 100_000])
        opener, closer = self.rng.choice([(b"[", b"]"), (b'{"a":', b"}")])
        inner = opener * depth + b"1" + closer * depth
        if self.rng.random() < 0.3:
            return "probe", opener * depth  # never closed
        job = self.dumps(self.base()).replace(b'{"hold_s":0}', b'{"hold_s":' + inner + b"}")
        return "probe", job

    def wrong_kind(self) -> tuple[str, bytes]:
        rng = self.rng
        job = self.base(kind=rng.choice(["probe", "backtest", "nosuch", "PROBE", "x" * 41, "sweep"]))
        if job["kind"] == "sweep":
            job["params"] = {"junk": True}
        subject_kind = rng.choice(
            [
                "probe",
                "backtest",
                "train",
                "sweep",
                "sweep_chunk",
                "nosuch",
                "Probe",
                "pr0be-x",
                "проба",
                "x" * 200,
            ]
        )
        if subject_kind == job["kind"]:
            subject_kind = "nosuch"
        return subject_kind, self.dumps(job)

    def unplaceable(self) -> tuple[str, bytes]:
        job = self.base()
        job["resources"] = self.rng.choice(
            [
                {"cpus": 500},
                {"memory_gb": 4000},
                {"gpus": 1, "gpu": "required"},
                {"gpus": 2, "gpu": "never"},
            ]
        )
        return "probe", self.dumps(job)

    def reuse_of_valid(self, target: str) -> tuple[str, bytes, str, str | None]:
        """A message naming a valid op's job id: never changes that op."""
        rng = self.rng
        original = next(job for job in self.valid if job["job_id"] == target)
        how = rng.randrange(6)
        if how == 0:  # other params: "job_id reused"
            job = json.loads(json.dumps(original))
            job["params"]["hold_s"] = 7.5
            return "probe", self.dumps(job), "reuse_params", self.msg_id()
        if how == 1:  # the same id with invalid params
            job = json.loads(json.dumps(original))
            job["params"]["hold_s"] = "soon"
            return "probe", self.dumps(job), "reuse_invalid", self.msg_id()
        if how == 2:  # the same params, a data directory outside the roots
            job = json.loads(json.dumps(original))
            job["data_dir"] = "/etc"
            return "probe", self.dumps(job), "reuse_invalid", self.msg_id()
        if how == 3:  # not a job at all, but its id can be peeked at
            body = self.dumps({"job_id": target, "kind": "probe", "params": 5})
            return "probe", body, "reuse_undecodable", self.msg_id()
        if how == 4:  # another kind
            job = self.base(target, kind="backtest")
            job["params"]["symbol"] = "../../etc/passwd"
            return "backtest", self.dumps(job), "reuse_kind", self.msg_id()
        # its Nats-Msg-Id: JetStream drops it as a duplicate
        job = json.loads(json.dumps(original))
        job["params"]["hold_s"] = 3.0
        return "probe", self.dumps(job), "reuse_msg_id", target

    def cancel(self) -> Message:
        """A submitter may publish cancels: garbage ones, for ops that do not exist."""
        op = self.rng.choice(["fz-ghost", "fz-nobody", f"{VALID_PREFIX}0", self.bad_id()])
        body = self.rng.choice(
            [
                lambda: self.rng.randbytes(self.rng.randrange(0, 300)),
                lambda: self.dumps({"event": "cancel", "op_id": self.rng.choice(self.valid_ids), "ts": 1}),
                lambda: self.dumps({"event": "cancel", "op_id": 5}),
                lambda: self.dumps(self.junk()),
            ]
        )()
        return Message("submitter", op_subject(op, "cancel"), body, "cancel")

    # -- runner events ------------------------------------------------------------------

    def runner_event(self, published_valid: list[str]) -> Message:
        rng = self.rng
        ts = 1.7e9
        own = [op for op in self.own_runners if op in published_valid]
        if own and rng.random() < 0.25:
            # a valid op's own credentials: garbage and events of other attempts only
            op = rng.choice(own)
            subject = op_subject(op, rng.choice(["progress", "log", "heartbeat"]))
            body = rng.choice(
                [
                    lambda: rng.randbytes(rng.randrange(0, 2000)),
                    lambda: self.dumps({"event": "progress", "op_id": op, "ts": "now", "percent": "x"}),
                    lambda: self.dumps(
                        {"event": "progress", "op_id": op, "ts": ts, "attempt": 9, "percent": 99}
                    ),
                    lambda: self.dumps({"event": "heartbeat", "op_id": op, "ts": ts, "attempt": -1}),
                    lambda: self.dumps({"event": "bogus", "op_id": op, "ts": ts, "attempt": 1}),
                    lambda: self.dumps(
                        {"event": "log", "op_id": op, "ts": ts, "attempt": 7, "message": "x" * 200_000}
                    ),
                    lambda: self.dumps(self.junk()),
                ]
            )()
            return Message(op, subject, body, "runner_own_garbage")
        op = rng.choice(self.ghosts)
        victim = rng.choice(published_valid or self.valid_ids)
        if rng.random() < 0.03:
            # outside its permissions: another op's events, status, jobs, records
            subject = rng.choice(
                [
                    op_subject(victim, "result"),
                    op_subject(victim, "status"),
                    op_subject(op, "status"),
                    op_subject(op, "cancel"),
                    f"ktrdr.jobs.probe.{SUBMITTER}",
                    f"$KV.{OPS_BUCKET}.{victim}",
                ]
            )
            body = self.dumps(
                {"event": "result", "op_id": victim, "ts": ts, "attempt": 1, "result": {"forged": 1}}
            )
            return Message(op, subject, body, "runner_forbidden", allowed=False)
        event = rng.choice(["progress", "log", "result", "error", "cancel_ack", "heartbeat"])
        forged = {"forged": 1}
        body = rng.choice(
            [
                lambda: rng.randbytes(rng.randrange(0, 3000)),
                lambda: self.dumps(
                    {"event": event, "op_id": victim, "ts": ts, "attempt": 1, "result": forged}
                ),
                lambda: self.dumps(
                    {"event": "result", "op_id": victim, "ts": ts, "attempt": 1, "result": forged}
                ),
                lambda: self.dumps(
                    {"event": "error", "op_id": victim, "ts": ts, "attempt": 1, "reason": "x", "message": "y"}
                ),
                lambda: self.dumps({"event": "cancel_ack", "op_id": victim, "ts": ts, "attempt": 1}),
                lambda: self.dumps({"event": "status", "op_id": victim, "ts": ts, "state": "failed"}),
                lambda: self.dumps({"event": "progress", "op_id": op, "ts": ts, "percent": {"a": [1]}}),
                lambda: self.dumps({"event": "log", "op_id": op, "ts": ts, "message": self.huge_string()}),
                lambda: self.dumps(
                    {
                        "event": "progress",
                        "op_id": op,
                        "ts": ts,
                        "percent": 1,
                        "metrics": {str(i): i for i in range(5000)},
                    }
                ),
                lambda: self.dumps(self.junk()),
                lambda: b"[" * 50_000,
            ]
        )()
        return Message(op, op_subject(op, event), body, "runner_garbage")

    # -- the whole run -------------------------------------------------------------------

    def _build(self) -> list[Message]:
        rng = self.rng
        categories: list[tuple[str, Callable[[], tuple[str, bytes]], float]] = [
            ("random_bytes", self.random_bytes, 14),
            ("broken_json", self.broken_json, 10),
            ("not_an_object", self.not_an_object, 5),
            ("wrong_type", self.wrong_type, 14),
            ("huge_value", self.huge_value, 3),
            ("bad_job_id", self.bad_job_id, 10),
            ("path_like", self.path_like, 12),
            ("unknown_field", self.unknown_field, 8),
            ("nested", self.nested, 1),
            ("wrong_kind", self.wrong_kind, 8),
            ("unplaceable", self.unplaceable, 4),
        ]
        names = [c[0] for c in categories]
        makers = {c[0]: c[1] for c in categories}
        weights = [c[2] for c in categories]
        out: list[Message] = []
        published: list[str] = []
        every = MALFORMED_JOBS // VALID_JOBS
        for i in range(MALFORMED_JOBS):
            if i % every == every // 2 and len(published) < VALID_JOBS:
                job = self.valid[len(published)]
                out.append(
                    Message("submitter", self.job_subject("probe"), self.dumps(job), "valid", job["job_id"])
                )
                published.append(job["job_id"])
            if i % (MALFORMED_JOBS // RUNNER_EVENTS) == 3:
                out.append(self.runner_event(published))
            roll = rng.random()
            if roll < 0.01:
                out.append(self.cancel())  # extra to the 10,000 jobs
            if roll < 0.06 and len(published) > 1:
                target = rng.choice(published[:-1])
                kind, data, category, msg_id = self.reuse_of_valid(target)
                out.append(
                    Message("submitter", self.job_subject(kind), data, category, msg_id, target=target)
                )
                continue
            category = rng.choices(names, weights)[0]
            kind, data = makers[category]()
            out.append(Message("submitter", self.job_subject(kind), data, category, self.msg_id()))
        return out
