"""The writes of one MLflow run, sent in order by a thread that outlives an outage of the store.

Training never waits on MLflow and never fails because of it: `Writer.put` only queues. The
thread sends each write in turn. When one fails because the store does not answer, it says so
once, tries the same write again after 1 s, 2 s, 4 s, ... (at most tracking.retry_max_wait),
says so again when the store is back, and goes on with the rest in order. An artifact that the
store refuses while it answers otherwise (a read-only or full artifact store) is set aside and
tried once more at the end, so it holds nothing up. What MLflow has not taken when the run ends
is saved to `<run folder>/tracking_backlog.jsonl`, and `python -m medlora.tracking replay
<run folder>` sends it later. Each checkpoint saves that file first too, so a run killed after a
checkpoint has lost none of the writes before it: its resumed run sends them.

A write may be sent twice (the store can take it and fail before it answers), so before a write
is tried again, and before a replay, the run is read back, and what it holds is not sent: a
metric whose (key, step) is at or below the highest step it holds for that key, a param it has
(a param with another value is a warning: MLflow params never change), a tag with the same
value, a table file it has, the status it has. Artifacts are sent again: an upload overwrites.

Written here rather than with MLflow's async logging (`log_batch(synchronous=False)`,
`mlflow.config.enable_async_logging`): its queue logs a batch that failed as an error and drops
it, keeps nothing once the process ends, and carries metrics, params and tags only. MLflow's own
HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES) are off, so a request to a store that is down
fails at once and all waiting happens here, where training does not feel it.
"""

from __future__ import annotations

import collections
import json
import logging
import posixpath
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medlora.config import MedloraError
from medlora.files import write_jsonl

log = logging.getLogger("medlora.tracking")
# what differs between the processes of one resumed run by design (each has its own Hydra folder,
# and the rerun may name the run it continues): not a change worth a warning
PER_PROCESS = ("paths.output_dir", "training.resume", "training.resume_from")

BACKLOG = "tracking_backlog.jsonl"
FIRST_WAIT_S = 1.0


def now_ms() -> int:
    return int(time.time() * 1000)


def brief(err: BaseException) -> str:
    """An error in a few words: the socket's reason where MLflow wraps one in urllib3's chain of
    messages (`[Errno 111] Connection refused`, `Read timed out`), else its first line."""
    text = str(err).strip()
    reason = re.search(r"\[Errno -?\d+\] [^'\")]+|Remote end closed connection without response|Read timed out", text)
    if reason:
        return reason.group(0)
    text = text.splitlines()[0] if text else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass
class Stored:
    """What a run holds, as far as a write can repeat it."""

    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    steps: dict[str, int] = field(default_factory=dict)  # the highest step of each metric key
    tables: set[str] = field(default_factory=set)
    status: tuple[str, int | None] | None = None

    @classmethod
    def of_run(cls, client, run) -> Stored:
        """What a run (an mlflow Run) holds that a write can repeat; tables aside: only evaluations log them."""
        stored = cls(params=dict(run.data.params), tags=dict(run.data.tags))
        stored.status = (run.info.status, run.info.end_time)
        for key in run.data.metrics:
            stored._read_steps(client, run.info.run_id, key)
        return stored

    def read(self, client, run_id: str, writes: Iterable[dict]) -> None:
        """Bring what `writes` touch up to date from the store; raises while it does not answer."""
        writes = list(writes)
        self._read_run(client, run_id)
        for key in {m[0] for w in writes if w["kind"] == "log" for m in w["metrics"]}:
            self._read_steps(client, run_id, key)
        for name in {w["artifact_file"] for w in writes if w["kind"] == "table"}:
            if name in {f.path for f in client.list_artifacts(run_id, posixpath.dirname(name) or None)}:
                self.tables.add(name)

    def _read_run(self, client, run_id: str) -> None:
        run = client.get_run(run_id)
        self.params.update(run.data.params)
        self.tags.update(run.data.tags)
        self.status = (run.info.status, run.info.end_time)

    def _read_steps(self, client, run_id: str, key: str) -> None:
        history = client.get_metric_history(run_id, key)
        if history:
            top = max(m.step for m in history)
            self.steps[key] = max(top, self.steps.get(key, top))

    def add(self, write: dict) -> None:
        """`write` is in the store now."""
        kind = write["kind"]
        if kind == "log":
            self.params.update(write["params"])
            self.tags.update(write["tags"])
            for key, _, _, step in write["metrics"]:
                self.steps[key] = max(step, self.steps.get(key, step))
        elif kind == "table":
            self.tables.add(write["artifact_file"])
        elif kind == "status":
            self.status = (write["status"], write["end_time"])


def unsent(write: dict, stored: Stored, run_id: str) -> dict | None:
    """`write` less what the run holds already; None when nothing is left to send."""
    kind = write["kind"]
    if kind == "table":
        return None if write["artifact_file"] in stored.tables else write
    if kind == "status":
        return None if stored.status == (write["status"], write["end_time"]) else write
    if kind != "log":
        return write
    params, changed = {}, []
    for key, value in write["params"].items():
        if key not in stored.params:
            params[key] = value
        elif stored.params[key] != value and key not in PER_PROCESS:
            changed.append(f"{key}={value} (it has {stored.params[key]})")
    if changed:
        log.warning(
            "MLflow run %s keeps the params it has (an MLflow param never changes), so these are not logged: %s",
            run_id,
            "; ".join(changed),
        )
    tags = {k: v for k, v in write["tags"].items() if stored.tags.get(k) != v}
    metrics = [m for m in write["metrics"] if m[0] not in stored.steps or m[3] > stored.steps[m[0]]]
    if not (params or tags or metrics):
        return None
    return {**write, "params": params, "tags": tags, "metrics": metrics}


def send(client, run_id: str, write: dict) -> None:
    """One write, as MLflow's client takes it."""
    kind = write["kind"]
    if kind == "log":
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

        params = [Param(k, v) for k, v in write["params"].items()]
        tags = [RunTag(k, v) for k, v in write["tags"].items()]
        metrics = [Metric(k, v, t, s) for k, v, t, s in write["metrics"]]
        # a request takes at most 100 params, 100 tags and 1000 entities in all
        per, m_per = MAX_PARAMS_TAGS_PER_BATCH, MAX_ENTITIES_PER_BATCH - 2 * MAX_PARAMS_TAGS_PER_BATCH
        for i in range(max(-(-len(params) // per), -(-len(tags) // per), -(-len(metrics) // m_per), 1)):
            client.log_batch(
                run_id,
                metrics=metrics[i * m_per : (i + 1) * m_per],
                params=params[i * per : (i + 1) * per],
                tags=tags[i * per : (i + 1) * per],
            )
    elif kind == "artifact":
        path = Path(write["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), write["artifact_path"])
        elif path.is_file():
            client.log_artifact(run_id, str(path), write["artifact_path"])
        else:  # removed since the run wrote it: no try can send it
            log.warning("not logging %s to MLflow run %s: it no longer exists", path, run_id)
    elif kind == "table":
        client.log_table(run_id, data=write["data"], artifact_file=write["artifact_file"])
    elif kind == "status":
        client.set_terminated(run_id, write["status"], write["end_time"])
    else:
        raise ValueError(f"unknown tracking write kind {kind!r}")


def refused(err: BaseException) -> bool:
    """The store answered and will never take the write (a bad value, a deleted run): no retry can help."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    status = err.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


class Writer:
    """The thread that sends one run's writes in order (the module docstring says how)."""

    def __init__(self, client, run_id: str, uri: str, stored: Stored, retry_max_wait: float):
        self.client, self.run_id, self.uri = client, run_id, uri
        self.stored = stored
        self.retry_max_wait = float(retry_max_wait)
        self.queue: collections.deque[dict] = collections.deque()  # the head is the write being sent
        self.aside: list[dict] = []  # artifacts the store refused while it answered: tried again at the end
        self.changed = threading.Condition()
        self.closing = False
        self.abandoned = threading.Event()  # set when close() stops waiting: the thread ends at once
        self.wake = threading.Event()  # cuts a wait between tries short: at close, and when abandoned
        self.down_since: float | None = None  # time.monotonic() of the first failure of this outage
        self.thread = threading.Thread(target=self._run, name=f"mlflow-writer-{run_id[:8]}", daemon=True)
        self.thread.start()

    def put(self, write: dict) -> None:
        with self.changed:
            self.queue.append(write)
            self.changed.notify_all()

    def close(self, patience: float) -> list[dict]:
        """Wait for the queue to empty: as long as the store answers, and `patience` seconds once it
        does not. Returns what the store has not taken, in order, the set-aside artifacts last."""
        self.wake.set()  # a store that is back by now gets its try at once, not after the current wait
        with self.changed:
            self.closing = True
            self.changed.notify_all()
            began = time.monotonic()
            while self.queue:
                if self.down_since is not None and time.monotonic() - max(self.down_since, began) >= patience:
                    break
                self.changed.wait(0.2)
            drained = not self.queue
        left = self.abandon()
        if not drained:
            return left
        # the store took the whole queue, so it answers: the set-aside artifacts get one more try
        return [write for write in left if not self._sent(write)]

    def pending(self) -> list[dict]:
        """What the store has not confirmed yet, in order, the set-aside artifacts last."""
        with self.changed:
            return list(self.queue) + self.aside

    def abandon(self) -> list[dict]:
        """Stop now: what the store has not taken, in order, the set-aside artifacts last."""
        with self.changed:
            self.abandoned.set()
            self.wake.set()
            return list(self.queue) + self.aside

    def _sent(self, write: dict) -> bool:
        try:
            send(self.client, self.run_id, write)
            return True
        except Exception:
            return False

    def _run(self) -> None:
        while True:
            with self.changed:
                while not self.queue and not self.closing:
                    self.changed.wait()
                if not self.queue or self.abandoned.is_set():
                    return
                write = self.queue[0]
            self._deliver(write)
            with self.changed:
                if self.abandoned.is_set():  # close() took the queue as it was, this write included
                    return
                self.queue.popleft()
                self.changed.notify_all()

    def _deliver(self, write: dict) -> None:
        """Send `write` (what of it the run lacks), trying again until the store takes it or close() gives up."""
        left, wait, known = unsent(write, self.stored, self.run_id), min(FIRST_WAIT_S, self.retry_max_wait), True
        while left is not None and not self.abandoned.is_set():
            try:
                if not known:
                    # the failed try may have reached the store before the answer was lost
                    self.stored.read(self.client, self.run_id, [left])
                    left, known = unsent(left, self.stored, self.run_id), True
                    if left is None:
                        break
                send(self.client, self.run_id, left)
                self.stored.add(left)
                break
            except Exception as err:
                if refused(err):
                    log.warning(
                        "MLflow refused a %s write to run %s, which is dropped: %s",
                        left["kind"],
                        self.run_id,
                        brief(err),
                    )
                    break
                if left["kind"] == "artifact" and self._answers():
                    self._set_aside(left, err)
                    break
                self._went_down(err)
                known = False
                self.wake.wait(wait)
                self.wake.clear()
                wait = min(2 * wait, self.retry_max_wait)
        if not self.abandoned.is_set():
            self._came_back()

    def _answers(self) -> bool:
        try:
            self.client.get_run(self.run_id)
            return True
        except Exception:
            return False

    def _set_aside(self, write: dict, err: Exception) -> None:
        if not self.aside:
            log.warning(
                "MLflow's artifact store did not take %s (%s): training goes on; this and any other artifact "
                "it refuses are tried again at the end of the run",
                write["path"],
                brief(err),
            )
        self.aside.append(write)

    def _went_down(self, err: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning(
                "MLflow at %s does not answer (%s): training goes on, and the run's writes wait until it is back",
                self.uri,
                brief(err),
            )

    def _came_back(self) -> None:
        if self.down_since is not None:
            log.warning(
                "MLflow at %s is back after %.0f s: sending the %d writes that waited",
                self.uri,
                time.monotonic() - self.down_since,
                len(self.queue),
            )
            self.down_since = None


def keep_backlog(folder: Path, uri: str, run_id: str, writes: list[dict]) -> Path | None:
    """Make `writes` the backlog of `run_id` in `folder`, each line naming its store and run (other
    runs' lines stay). With no writes the run's lines go, and the file once it holds none.
    Returns the file while it holds lines."""
    path = Path(folder) / BACKLOG
    rows = [row for row in read_backlog(path) if row["run_id"] != run_id] if path.is_file() else []
    rows += [{"tracking_uri": uri, "run_id": run_id, **write} for write in writes]
    if rows:
        write_jsonl(path, rows)
        return path
    path.unlink(missing_ok=True)
    return None


def backlog_of(folder: Path, run_id: str) -> list[dict]:
    """The writes of `run_id` that `folder`'s backlog holds, in order."""
    path = Path(folder) / BACKLOG
    rows = read_backlog(path) if path.is_file() else []
    return [
        {k: v for k, v in row.items() if k not in ("tracking_uri", "run_id")} for row in rows if row["run_id"] == run_id
    ]


def read_backlog(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def replay(folder: Path, tracking_uri: str | None = None) -> list[str]:
    """Send a run folder's backlog, run by run and in order; returns a line per run saying what was sent.
    Safe to repeat: what the run holds is not sent again."""
    from mlflow import MlflowClient

    path = Path(folder) / BACKLOG
    if not path.is_file():
        raise MedloraError(
            f"{path} does not exist: give the folder of a run whose log says its MLflow writes were saved there."
        )
    runs: dict[tuple[str, str], list[dict]] = {}
    for row in read_backlog(path):
        uri, run_id = row.pop("tracking_uri"), row.pop("run_id")
        runs.setdefault((tracking_uri or uri, run_id), []).append(row)
    reports = []
    for (uri, run_id), writes in runs.items():
        client, stored = MlflowClient(tracking_uri=uri), Stored()
        try:
            stored.read(client, run_id, writes)
        except Exception as err:
            raise MedloraError(
                f"cannot reach MLflow run {run_id} at {uri} ({brief(err)}): nothing of it was sent. "
                "Start the server (or give --tracking-uri) and run this again."
            ) from err
        sent: collections.Counter[str] = collections.Counter()
        for number, write in enumerate(writes, 1):
            left = unsent(write, stored, run_id)
            if left is None:
                continue
            try:
                send(client, run_id, left)
            except Exception as err:
                raise MedloraError(
                    f"MLflow at {uri} failed write {number} of {len(writes)} of run {run_id} ({brief(err)}); "
                    "the writes before it are in. Run this again once it is fixed: none is sent twice."
                ) from err
            stored.add(left)
            _count(left, sent)
        reports.append(f"run {run_id}: " + (_described(sent) or "MLflow holds every write already"))
    return reports


def _count(write: dict, sent: collections.Counter) -> None:
    if write["kind"] == "log":
        sent.update(metric=len(write["metrics"]), param=len(write["params"]), tag=len(write["tags"]))
    elif write["kind"] == "status":
        sent["status " + write["status"]] = 1
    else:
        sent[write["kind"]] += 1


def _described(sent: collections.Counter) -> str:
    """'sent 40 metric values, 1 tag, 4 artifacts, the status FINISHED', or '' for nothing."""
    words = {"metric": ("metric value", "metric values"), "param": ("param", "params"), "tag": ("tag", "tags")}
    words |= {"artifact": ("artifact", "artifacts"), "table": ("table", "tables")}
    parts = [f"{sent[k]} {one if sent[k] == 1 else many}" for k, (one, many) in words.items() if sent[k]]
    parts += [f"the {k}" for k in sent if k.startswith("status ")]
    return "sent " + ", ".join(parts) if parts else ""
