"""Cost of one authorization decision: cached, uncached (compiled bundle), and a plain query.

    python bench/policy_decision.py [--policy policy/authz.rego] [-n 20000] [--rounds 5] [--json]

`cached` is `PolicyEngine.decide` answering from its cache (what nearly every call pays);
`uncached` is `decide` after dropping the cache (input built + one bundle query: what the first
call of a (method, roles, scopes) pays); `plain query` is regopy's `query()` on the same policy
without a prebuilt bundle, for reference. Prints the median of the rounds, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen" / "python")]

from services.common.auth.authz import (  # noqa: E402
    DEFAULT_POLICY_FILE,
    PolicyEngine,
    policy_input,
)
from services.common.auth.principal import Principal  # noqa: E402

METHOD = "/soma.gateway.v1.GatewayService/GetSession"


def per_call_us(fn: Callable[[], object], n: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, default=DEFAULT_POLICY_FILE)
    parser.add_argument("-n", type=int, default=20000, help="decisions per round (cached)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    engine = PolicyEngine(args.policy, reload_interval=3600)
    principal = Principal(
        subject="key:bench",
        tenant="bench",
        roles=frozenset({"member"}),
        scopes=frozenset({"gateway:read", "gateway:write"}),
        credential="api_key",
    )
    assert engine.decide(principal, METHOD).allow

    def uncached() -> object:
        engine.clear_cache()
        return engine.decide(principal, METHOD)

    interpreter = engine._compiled.interpreter  # the same compiled modules, queried plainly
    data = policy_input(principal, METHOD)

    def plain_query() -> object:
        interpreter.set_input(data)
        return interpreter.query("data.soma.authz.decision")

    results = {
        "cached_us": per_call_us(lambda: engine.decide(principal, METHOD), args.n, args.rounds),
        "uncached_us": per_call_us(uncached, max(args.n // 20, 200), args.rounds),
        "plain_query_us": per_call_us(plain_query, max(args.n // 100, 50), args.rounds),
    }
    results["uncached_over_cached"] = results["uncached_us"] / results["cached_us"]
    if args.json:
        print(json.dumps({k: round(v, 3) for k, v in results.items()}))
        return 0
    print(f"policy {args.policy}, method {METHOD}, roles member, median of {args.rounds} rounds")
    print(f"  cached decision       {results['cached_us']:10.2f} µs")
    print(f"  uncached (bundle)     {results['uncached_us']:10.2f} µs")
    print(f"  plain regopy query()  {results['plain_query_us']:10.2f} µs")
    print(f"  uncached / cached     {results['uncached_over_cached']:10.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
