"""Event ids and envelopes: derived from what identifies the event, nothing else."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from relay.config import QingStorSourceConfig
from relay.errors import Forbidden, InvalidBody, Unauthorized
from relay.models import NotifierBatch, notifier_envelopes
from relay.sources import RequestMeta
from relay.sources.base import token_matches
from relay.sources.qingstor import QingStorSource
from tests.conftest import notifier_body, sample

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
META = RequestMeta(headers={}, query={})


def envelopes(body, at=NOW, source="qingstor"):
    return QingStorSource(source, QingStorSourceConfig(kind="qingstor")).parse(META, body, at)


def test_ids_ignore_receive_time_and_source_name():
    first = envelopes(sample())
    later = envelopes(sample(), at=NOW + timedelta(hours=3), source="other")
    assert first[0].id == later[0].id
    assert first[0].received_at != later[0].received_at


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r["response_elements"].update(request_id="other"),
        lambda r: r["qingstor"].update(notification_id="other"),
        lambda r: r.update(event_type="delete_object"),
        lambda r: r["qingstor"]["bucket"].update(name="other"),
        lambda r: r["qingstor"]["object"].update(name="other"),
    ],
)
def test_each_identifying_field_changes_the_id(change):
    body = sample()
    change(body["events"][0])
    assert envelopes(body)[0].id != envelopes(sample())[0].id


def test_non_identifying_fields_do_not_change_the_id():
    body = sample()
    body["events"][0]["event_time"] = "2030-01-01T00:00:00Z"
    body["events"][0]["qingstor"]["object"]["size"] = 1
    assert envelopes(body)[0].id == envelopes(sample())[0].id


def test_multipart_spellings_share_one_id():
    rule = envelopes(notifier_body("k", kind="complete_multipart"))[0]
    record = envelopes(notifier_body("k", kind="complete_upload"))[0]
    assert rule.id == record.id and rule.type == record.type == "complete_multipart"


def test_parts_cannot_collide_across_separators():
    a = envelopes(notifier_body("b/c"))
    body = notifier_body("c")
    body["events"][0]["qingstor"]["bucket"]["name"] = "max-test2/b"
    assert a[0].id != envelopes(body)[0].id


def test_envelope_keeps_the_record_untouched_and_is_json():
    body = sample()
    body["events"][0]["unknown_future_field"] = {"x": [1, 2]}
    [envelope] = envelopes(body)
    assert envelope.data == body["events"][0]
    assert envelope.to_dict()["received_at"] == "2026-01-02T03:04:05.000Z"


def test_unknown_event_types_are_kept_not_refused():
    [envelope] = envelopes(notifier_body("k", kind="restore_object"))
    assert envelope.type == "restore_object"


def test_tupu_porn_without_nonce_is_identified_by_its_result():
    body = sample("tupu-porn-result.json")
    del body["result"]["nonce"]
    one = envelopes(body)[0]
    body["result"]["reviewCount"] = 1
    assert envelopes(body)[0].id != one.id


def test_validation_messages_name_the_field_but_not_the_value():
    body = sample()
    body["events"][0]["qingstor"]["object"]["size"] = "SECRET-LOOKING-VALUE"
    with pytest.raises(InvalidBody) as caught:
        envelopes(body)
    assert "events.0.qingstor.object.size" in caught.value.message
    assert "SECRET-LOOKING-VALUE" not in caught.value.message


def test_bad_event_time_is_refused():
    body = sample()
    body["events"][0]["event_time"] = "yesterday"
    with pytest.raises(ValidationError):
        NotifierBatch.model_validate(body)


def test_notifier_envelopes_one_per_record():
    body = notifier_body("a", "b", "c")
    batch = NotifierBatch.model_validate(body)
    assert [e.key for e in notifier_envelopes(body, batch, "q", NOW)] == ["a", "b", "c"]


def test_token_check_is_constant_time_and_fails_closed():
    assert token_matches("abc", "abc")
    assert not token_matches("abc", None)
    assert not token_matches("abc", "")
    assert not token_matches("abc", "abcd")
    assert not token_matches("abc", "ab\u00e9")


def test_authentication_order_and_sources_of_the_token():
    from ipaddress import ip_network

    source = QingStorSource(
        "q",
        QingStorSourceConfig(kind="qingstor", token="t0k", allow_ips=[ip_network("192.0.2.0/24")]),
    )
    source.authenticate(RequestMeta(headers={}, query={"token": "t0k"}, remote="192.0.2.7"))
    source.authenticate(RequestMeta(headers={"X-Relay-Token": "t0k"}, query={}, remote="192.0.2.7"))
    with pytest.raises(Unauthorized) as missing:
        source.authenticate(RequestMeta(headers={}, query={}, remote="192.0.2.7"))
    assert missing.value.code == "missing_token"
    with pytest.raises(Unauthorized) as wrong:
        source.authenticate(RequestMeta(headers={}, query={"token": "nope"}, remote="192.0.2.7"))
    assert wrong.value.code == "invalid_token" and "t0k" not in wrong.value.message
    with pytest.raises(Forbidden):
        source.authenticate(RequestMeta(headers={}, query={"token": "t0k"}, remote="198.51.100.1"))
    with pytest.raises(Forbidden):
        source.authenticate(RequestMeta(headers={}, query={"token": "t0k"}))
