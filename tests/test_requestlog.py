"""The request log keeps personal data and secrets out: typed placeholders by default, counted per line and in
`/metrics`, raw text only when asked for, and files only their owner can read."""

from __future__ import annotations

import json
import logging
import random
import stat
import time
from collections import Counter

from tunewright.scoring import pii
from tunewright.serve import requestlog
from tunewright.serve.requestlog import RequestLog, record

EMAIL, CARD, PHONE = "jane.doe@example.co.uk", "4111 1111 1111 1111", "+44 20 7946 0958"
IBAN, SSN = "GB82 WEST 1234 5698 7654 32", "123-45-6789"  # the card Luhn-valid, the IBAN mod-97-valid
RAW = (EMAIL, CARD, PHONE, IBAN, SSN)
TEXT = f"I am {EMAIL}, card {CARD}, phone {PHONE}, IBAN {IBAN}, SSN {SSN}."
EACH = {"email": 1, "card": 1, "phone": 1, "iban": 1, "ssn": 1}


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_personal_data_is_logged_as_typed_placeholders_in_files_only_the_owner_reads(tmp_path):
    """E-mail, card, phone, IBAN and SSN in messages (text and parts), prompt, answer and error become placeholders,
    each line says what it lost, the totals add up; a long prompt is redacted throughout; the folder the log makes
    is 0700, its file 0600."""
    long = " ".join(f"the order page shows nothing {i} times {RAW[i % 5]}" for i in range(2000))
    log = RequestLog(tmp_path / "logs" / "requests", flush_seconds=0.05)
    log.write(record(messages=[{"role": "user", "content": f"I am {EMAIL}, card {CARD}"},
                               {"role": "user", "content": [{"type": "text", "text": f"call {PHONE}"}]}],
                     answer=f"Refund sent to {IBAN}", status=200))
    log.write(record(prompt=f"SSN {SSN}, again {EMAIL}", status=400, error=f"prompt: bad text near '{CARD}'"))
    log.write(record(prompt="order A12345 of 2024-05-01, ticket 4111 1111 1111 1112", status=200))  # nothing to redact
    log.write(record(prompt=long, status=200))
    log.close()
    folder = tmp_path / "logs" / "requests"
    [path] = folder.glob("*.jsonl")
    text = path.read_text(encoding="utf-8")
    assert [v for v in RAW if v in text] == []
    rows = [json.loads(line) for line in text.splitlines()]
    assert rows[0]["messages"] == [{"role": "user", "content": "I am [EMAIL], card [CARD]"},
                                   {"role": "user", "content": [{"type": "text", "text": "call [PHONE]"}]}]
    assert rows[0]["answer"] == "Refund sent to [IBAN]"
    assert rows[0]["redacted"] == {"email": 1, "card": 1, "phone": 1, "iban": 1}
    assert rows[1]["prompt"] == "SSN [SSN], again [EMAIL]" and rows[1]["error"] == "prompt: bad text near '[CARD]'"
    assert rows[1]["redacted"] == {"ssn": 1, "email": 1, "card": 1}
    assert rows[2]["prompt"] == "order A12345 of 2024-05-01, ticket 4111 1111 1111 1112" and "redacted" not in rows[2]
    expected = long
    for value, kind in zip(RAW, ("email", "card", "phone", "iban", "ssn")):
        expected = expected.replace(value, f"[{kind.upper()}]")
    assert rows[3]["prompt"] == expected and rows[3]["redacted"] == {k: 400 for k in EACH}
    assert log.redactions == {"email": 402, "card": 402, "phone": 401, "iban": 401, "ssn": 401}
    assert _mode(folder) == 0o700 and _mode(path) == 0o600



def test_keys_sent_in_prompts_are_logged_as_typed_placeholders(tmp_path):
    """An AWS key pair and a private key block (stage 1's secret detectors) go the way of personal data."""
    aws_id, aws_secret = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    pem = ("-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5ZWmcPGCIm8LqoAoGCCqGSM49\n"
           "-----END EC PRIVATE KEY-----")
    log = RequestLog(tmp_path / "requests.jsonl", flush_seconds=0.05)
    log.write(record(prompt=f"deploy with {aws_id} / {aws_secret}, mail {EMAIL}", answer=f"Never paste:\n{pem}",
                     status=200))
    log.close()
    [row] = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text(encoding="utf-8").splitlines()]
    assert row["prompt"] == "deploy with [AWS_ACCESS_KEY] / [AWS_SECRET_KEY], mail [EMAIL]"
    assert row["answer"] == "Never paste:\n[PRIVATE_KEY]"
    assert row["redacted"] == {"aws_access_key": 1, "aws_secret_key": 1, "private_key": 1, "email": 1}

def test_raw_text_is_kept_when_asked_for_with_a_warning(tmp_path, caplog):
    path = tmp_path / "requests.jsonl"
    with caplog.at_level(logging.WARNING, logger="tunewright.serve"):
        log = RequestLog(path, flush_seconds=0.05, redact=False)
    log.write(record(messages=[{"role": "user", "content": TEXT}], answer=TEXT, status=200))
    log.close()
    [row] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert row["messages"][0]["content"] == TEXT and row["answer"] == TEXT and "redacted" not in row
    assert not log.redactions and "personal data included" in caplog.text
    assert _mode(path) == 0o600


def test_a_long_text_redacted_in_pieces_is_redacted_as_in_one_pass():
    """The cuts between pieces never split a match: texts dense with spaced card numbers, IBANs and phone numbers
    come out as one pass over the whole text makes them, with the same counts."""
    rng = random.Random(3)
    words = ["refund", "order", "page", "  ", "\n", "Orbit", "A1234", "it's", "(late)"] + list(RAW) + [IBAN, CARD] * 3
    for _ in range(4):
        text = " ".join(rng.choice(words) for _ in range(6 * requestlog.PIECE // 10))
        assert len(text) > 3 * requestlog.PIECE
        pieces, whole = Counter(), Counter()
        assert requestlog.redact_text(text, pieces) == pii.redact(text, found=whole)
        assert pieces == whole and whole["card"] > 100


def test_served_and_refused_requests_reach_the_log_and_metrics_without_personal_data(tiny_model_dir, state, tmp_path):
    """Chat (text and parts), completion and refused requests (unknown model named by an e-mail address, too many
    tokens) carrying PII: the log file holds none of it, and `/metrics` counts the placeholders by kind."""
    import httpx

    from tests.test_serve import _engine, serving

    engine, _ = _engine([f"m={tiny_model_dir}"], state)
    path = tmp_path / "requests.jsonl"
    log = RequestLog(path, flush_seconds=0.05)
    user = [{"role": "user", "content": TEXT}]
    bodies = [("/v1/chat/completions", {"model": "m", "max_tokens": 4, "messages": user}),
              ("/v1/chat/completions", {"model": "m", "max_tokens": 4, "messages": [
                  {"role": "user", "content": [{"type": "text", "text": TEXT}]}]}),
              ("/v1/completions", {"model": "m", "max_tokens": 4, "prompt": TEXT}),
              ("/v1/chat/completions", {"model": EMAIL, "messages": user}),
              ("/v1/chat/completions", {"model": "m", "max_tokens": 99, "messages": user})]
    with serving(engine, max_tokens=8, request_log=log) as (url, _app):
        statuses = [httpx.post(f"{url}{where}", json=body, timeout=60).status_code for where, body in bodies]
        deadline = time.monotonic() + 30
        while log.written < len(bodies) and time.monotonic() < deadline:
            time.sleep(0.02)
        metrics = httpx.get(f"{url}/metrics").text
    assert statuses == [200, 200, 200, 404, 400]
    text = path.read_text(encoding="utf-8")
    assert [v for v in RAW if v in text] == []
    rows = {r["status"]: r for r in map(json.loads, text.splitlines())}
    assert rows[404]["model"] == "[EMAIL]" and "[EMAIL]" in rows[404]["error"]
    assert rows[404]["redacted"] == {**EACH, "email": 3} and rows[400]["redacted"] == EACH
    assert log.redactions == {**{k: 5 for k in EACH}, "email": 7}
    for kind, n in log.redactions.items():
        assert f'tunewright_request_log_redactions{{kind="{kind}"}} {n}.0' in metrics


def test_a_line_a_killed_server_left_unfinished_costs_only_itself(tmp_path):
    """A log whose last line was cut short by a kill: the restarted log writes its records on lines of their own,
    and stage 7 reads the window with that one line skipped (warned about, naming the file and line)."""
    from tasks.monitor import read_window

    log = tmp_path / "requests.jsonl"
    whole = json.dumps(record(status=200, prompt="first", answer="a"))
    log.write_text(whole + "\n" + whole[:25])  # the kill came mid-line
    writer = RequestLog(log, flush_seconds=0.05)
    for i in range(3):
        writer.write(record(status=200, prompt=f"after {i}", answer="b"))
    writer.close()
    lines = log.read_text().splitlines()
    assert lines[1] == whole[:25] and len(lines) == 5
    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda rec: warned.append(rec.getMessage())
    logging.getLogger("tunewright").addHandler(handler)
    try:
        kept = read_window(str(log), 0, time.time() + 60)
    finally:
        logging.getLogger("tunewright").removeHandler(handler)
    assert [r["prompt"] for r in kept] == ["first", "after 0", "after 1", "after 2"]
    assert any(w.startswith(f"{log} line 2: skipped") for w in warned), warned
