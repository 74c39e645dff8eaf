"""Workers' logs for `infergate logs`: read from the files the launcher keeps.

Every line a worker logs starts with its time (configure_logging's format);
lines that do not (a traceback's) take the time of the line before. `--since`
filters on that time; `-f` follows with a cursor: the byte offset reached in
each instance's live log, so nothing is shown twice or skipped (a log rotated
meanwhile is read again from its start).
"""
from __future__ import annotations

import datetime
import os

MAX_LINES = 5000  # per answer: the newest, when there are more
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"


def line_time(line: str) -> float | None:
    try:
        return datetime.datetime.strptime(line[:23], _TIME_FORMAT).timestamp()
    except ValueError:
        return None


def _read_from(path: str, offset: int) -> tuple[str, int]:
    """The text of `path` from `offset` (0 when the file is now shorter: rotated), and
    the offset reached."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset > size:
                offset = 0
            f.seek(offset)
            data = f.read(size - offset)
    except OSError:
        return "", 0
    return data.decode("utf-8", "replace"), offset + len(data)


def read_logs(paths: dict[str, str], instance: str | None = None, since: float | None = None,
              cursor: dict | None = None) -> dict:
    """{"lines": [[instance, time, text]], "cursor": {instance: offset}} of the logs in
    `paths` (instance -> log path): all of them (the rotated part first), or, with a
    cursor, what was written since."""
    lines, reached = [], {}
    for name, path in paths.items():
        if instance and instance not in (name, name.rpartition(":")[2]):
            continue
        texts = []
        if cursor is None:
            texts.append(_read_from(path + ".1", 0)[0])
            text, reached[name] = _read_from(path, 0)
        else:
            text, reached[name] = _read_from(path, int(cursor.get(name, 0)))
        texts.append(text)
        at = None
        for line in "".join(texts).splitlines():
            at = line_time(line) or at
            if since is not None and (at is None or at < since):
                continue
            lines.append([name, at, line])
    lines.sort(key=lambda item: item[1] or 0.0)  # stable: each log's order is kept
    return {"lines": lines[-MAX_LINES:], "cursor": reached}
