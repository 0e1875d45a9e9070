#!/usr/bin/env python3
"""The official verdict on Stripe-Signature headers, for ingest's parity test.

Reads JSON lines on stdin, one case each:
    {"payload_hex": "...", "header": "t=...,v1=..." or null, "secrets": ["whsec_..."], "now": 1800000000}
`header` holds the header's bytes one per character (ISO-8859-1), as HTTP frameworks hand
them to Stripe's libraries. Writes one JSON line per case:
    {"accepted": true|false, "reason": "..."}
A case is accepted when stripe-python's `WebhookSignature.verify_header` (the check inside
`Webhook.construct_event`) accepts it, with tolerance 300 s, for at least one of the secrets
(secrets are rolled by trying each), at the given `now`: `time.time` is replaced by it, so the
verdict does not depend on when this runs.

Exits 3 with a message on stderr when the `stripe` package cannot be imported: the parity
test must fail then, never pass by skipping.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# Where deploy/test.sh installs the pinned package (pip --target), unless told otherwise.
sys.path.insert(
    0,
    os.environ.get(
        "STRIPE_PYTHON_PATH",
        os.path.join(HERE, "..", "..", "target", "parity-python"),
    ),
)

try:
    import stripe
    import stripe._webhook as stripe_webhook
except ImportError as error:
    sys.stderr.write(
        "parity: cannot import stripe (%s); install it with\n"
        "  python3 -m pip install --target target/parity-python stripe==16.1.0\n" % error
    )
    sys.exit(3)

TOLERANCE = 300


class FixedClock:
    """Stands in for the `time` module inside stripe._webhook."""

    def __init__(self):
        self.now = 0

    def time(self):
        return self.now


def verdict(case, clock):
    payload = bytes.fromhex(case["payload_hex"])
    clock.now = case["now"]
    reasons = []
    for secret in case["secrets"]:
        try:
            stripe.WebhookSignature.verify_header(payload, case["header"], secret, TOLERANCE)
            return {"accepted": True, "reason": "verified"}
        except Exception as error:  # the verdict is "refused" whatever the library raises
            reasons.append("%s: %s" % (type(error).__name__, str(error)[:120]))
    return {"accepted": False, "reason": "; ".join(reasons)}


def main():
    clock = FixedClock()
    stripe_webhook.time = clock
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        out.write(json.dumps(verdict(json.loads(line), clock)) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
