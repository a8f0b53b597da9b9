"""Schemathesis hooks for ./stack.sh test (SCHEMATHESIS_HOOKS=schemathesis_hooks).

The seed listings, ids 1 to 1000, are what the benchmarks and the
integration tests read and write, and a delete cannot be undone: the
tombstone stays (docs/decisions.md). So a DELETE that Schemathesis aims at
a seed listing goes to an id that no listing has instead, where it still
exercises every check before the 404. Listings it created itself, and those
the tests created, it deletes for real.
"""

import schemathesis

SEED_IDS = range(1, 1001)
NOWHERE = 900_000_000_000


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    if case.method.upper() == "DELETE":
        try:
            id_ = int(case.path_parameters.get("id"))
        except (TypeError, ValueError):
            return
        if id_ in SEED_IDS:
            case.path_parameters["id"] = NOWHERE + id_
