#!/usr/bin/env python3
"""Independent reference for the sweeper's cron fire times across DST changes.

Usage: dst_reference.py KIND TZ START END

KIND is `wildcard` for `0 */5 22-23,0-5 * * *` or `fixed` for `0 30 2 * * *`,
TZ an IANA name, START and END RFC 3339 UTC instants. Prints the fire instants
in (START, END], one RFC 3339 UTC instant per line.

It implements the documented semantics by brute force over real instants with
the standard library's `zoneinfo`, sharing no code or library with the Rust
implementation (which iterates naive local times with the `cron` crate and maps
them with `chrono-tz`):

* wildcard: every real minute whose local wall-clock time is a 5-minute mark
  between 22:00 and 05:55 fires; a repeated local time fires at both instants,
  a skipped one does not fire.
* fixed: on each local date, the first instant whose local time is 02:30; if
  02:30 does not exist that date (the clock jumps over it), the first instant
  after the jump.
"""

import sys
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

MINUTE = timedelta(minutes=1)


def parse_utc(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def local_naive(instant, tz):
    return instant.astimezone(tz).replace(tzinfo=None)


def minutes(start, end):
    """Every whole UTC minute in [start, end]."""
    instant = start.replace(second=0, microsecond=0)
    if instant < start:
        instant += MINUTE
    while instant <= end:
        yield instant
        instant += MINUTE


def wildcard(tz, start, end):
    for instant in minutes(start, end):
        local = local_naive(instant, tz)
        hour_ok = local.hour >= 22 or local.hour <= 5
        if local.second == 0 and local.minute % 5 == 0 and hour_ok:
            yield instant


def fixed(tz, start, end):
    fired_dates = set()
    previous = None
    for instant in minutes(start, end):
        local = local_naive(instant, tz)
        target = local.replace(hour=2, minute=30, second=0, microsecond=0)
        fire = False
        if local == target:
            fire = True
        elif previous is not None and previous < target < local:
            # The wall clock jumped over 02:30 of this date.
            fire = True
        if fire and local.date() not in fired_dates:
            fired_dates.add(local.date())
            yield instant
        previous = local


def main(argv):
    if len(argv) != 5 or argv[1] not in ("wildcard", "fixed"):
        sys.exit(__doc__)
    kind, tz, start, end = argv[1], ZoneInfo(argv[2]), parse_utc(argv[3]), parse_utc(argv[4])
    # Start two days early so "first occurrence per local date" is decided with
    # the whole date in view, then keep (start, end].
    generate = wildcard if kind == "wildcard" else fixed
    for instant in generate(tz, start - timedelta(days=2), end):
        if instant > start:
            print(instant.strftime("%Y-%m-%dT%H:%M:%SZ"))


if __name__ == "__main__":
    main(sys.argv)
