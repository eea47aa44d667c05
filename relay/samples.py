"""QingStor's documented sample bodies. Pure data: send-test posts them, and message
templates are checked against the envelopes relay makes of them."""

from __future__ import annotations

from typing import Any

# The documented samples (tests/fixtures/, from QingStor's documentation), embedded so
# that an installed relay needs no data files.
NOTIFIER_SAMPLE: dict[str, Any] = {
    "events": [
        {
            "event_source": "qingstor",
            "event_version": "1.0",
            "event_type": "create_object",
            "event_time": "2021-08-31T06:25:46.000Z",
            "zone_id": "gamma",
            "user_identify": {"principal_id": "usr-iks7Beds"},
            "response_elements": {"request_id": "45b47b6a30678cb2"},
            "qingstor": {
                "schema_version": "1.0",
                "notification_id": "mp4-notify",
                "bucket": {"name": "max-test2"},
                "object": {
                    "name": "abc/5.mp4",
                    "etag": "10c918b1d01aea85864ee65d9e0c2305",
                    "size": 9840497,
                },
            },
        }
    ]
}
TUPU_PORN_SAMPLE: dict[str, Any] = {
    "bucket": "fakebucket",
    "object": "porn.jpeg",
    "result": {
        "code": 0,
        "message": "success",
        "54bcfc6c329af61034f7c2fc": {
            "fileList": [
                {"label": 2, "name": "porn.jpeg", "rate": 0.9836746454238892, "review": False}
            ]
        },
        "nonce": "0.2297668219538047",
        "reviewCount": 0,
        "statistic": [0, 0, 1],
        "timestamp": 1498647797834.0,
    },
}
