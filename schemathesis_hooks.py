"""Schemathesis hooks for ./stack.sh test (SCHEMATHESIS_HOOKS=schemathesis_hooks).

The seed listings, ids 1 to 1000, are what the benchmarks and the
integration tests read and write, and a delete cannot be undone: the
tombstone stays (docs/decisions.md). So a DELETE that Schemathesis aims at
a seed listing goes to an id that no listing has instead, where it still
exercises every check before the 404. Listings it created itself, and those
the tests created, it deletes for real.

A session token the document calls valid can still name a time no region
has reached (any number of microseconds is valid): the region waits a
second for it and answers 503, rightly. So the times of a valid token are
set to 1 µs after the epoch, which every region has passed; a token that is
not valid goes as generated, to its 400.
"""

import re

import schemathesis

SEED_IDS = range(1, 1001)
NOWHERE = 900_000_000_000
VALID_TOKEN = re.compile(r"^v1(;us=[1-9][0-9]{0,17})?(;eu=[1-9][0-9]{0,17})?$")


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    token = (case.headers or {}).get("X-Session-Token")
    if isinstance(token, str) and VALID_TOKEN.match(token):
        case.headers["X-Session-Token"] = re.sub(r"=[0-9]+", "=1", token)
    if case.method.upper() == "DELETE":
        try:
            id_ = int(case.path_parameters.get("id"))
        except (TypeError, ValueError):
            return
        if id_ in SEED_IDS:
            case.path_parameters["id"] = NOWHERE + id_
