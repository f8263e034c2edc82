"""Secrets in data: credentials become typed placeholders counted by kind (stage 1; the request log's test is in
test_requestlog.py), hashes, UUIDs and base64 data stay, the recipe's own patterns are validated and applied."""

from __future__ import annotations

import base64
import hashlib
import random
import string
from collections import Counter

import pytest

from tunewright.recipe import DataConfig, RecipeError, load_recipe
from tunewright.scoring import secrets
from tests.conftest import write_jsonl
from tests.test_data_stage1 import lines, qa, reconciles, run

AWS_ID, AWS_SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
BODY = "\n".join(base64.b64encode(hashlib.sha512(bytes([i])).digest()[:48]).decode() for i in range(6))
PEM = f"-----BEGIN RSA PRIVATE KEY-----\n{BODY}\n-----END RSA PRIVATE KEY-----"
GITHUB = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"
SLACK = "xoxb-2048523745-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
# rows that must come through as they are: digests, UUIDs, base64 data, key words in prose, code that names a secret
CLEAN = [
    f"sha256 {hashlib.sha256(b'x').hexdigest()}, md5 {hashlib.md5(b'x').hexdigest()}, "
    f"commit {hashlib.sha1(b'x').hexdigest()}",
    "request id 123e4567-e89b-12d3-a456-426614174000 and trace 9b2c4f1e-55aa-4c3b-8d7e-0f1a2b3c4d5e",
    "img: data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==",
    base64.b64encode(bytes(range(200))).decode(),
    "Password: Required. Here's a secret: I love pizza. The key: practice. tokenizer=gpt2 max_tokens=512",
    'api_key = os.environ["OPENAI_API_KEY"]\npassword = getpass("Password: ")\ntokenizer.pad_token = tokenizer.eos_token',
    "password: ${DB_PASSWORD} token=<your-token-here> secret_key=None",
]


def tok(n: int, alphabet: str = string.ascii_letters + string.digits, seed: int = 0) -> str:
    rng = random.Random(seed * 1000 + n)
    return "".join(rng.choice(alphabet) for _ in range(n))


def redacted(text: str) -> tuple[str, dict]:
    found: Counter = Counter()
    return secrets.redact(text, found), dict(found)


def test_credentials_become_typed_placeholders_counted_by_kind():
    """An AWS key pair (named, and bare beside its id), a private key block whole, GitHub and Slack tokens, passwords
    in connection strings and quoted or unquoted assignments: each replaced alone, the text around it kept."""
    assert redacted(f"[default]\naws_access_key_id = {AWS_ID}\naws_secret_access_key = {AWS_SECRET}\n") == (
        "[default]\naws_access_key_id = [AWS_ACCESS_KEY]\naws_secret_access_key = [AWS_SECRET_KEY]\n",
        {"aws_access_key": 1, "aws_secret_key": 1})
    assert redacted(f"my keys are {AWS_ID} and {AWS_SECRET}, why is S3 refusing them?") == (
        "my keys are [AWS_ACCESS_KEY] and [AWS_SECRET_KEY], why is S3 refusing them?",
        {"aws_access_key": 1, "aws_secret_key": 1})
    assert redacted(f"ssh says the key is bad:\n{PEM}\nwhat now?") == (
        "ssh says the key is bad:\n[PRIVATE_KEY]\nwhat now?", {"private_key": 1})
    # a block cut short loses its header and every key line, not the question after it
    assert redacted(f"{PEM[:150]}\n\nIs this right?") == ("[PRIVATE_KEY]\n\nIs this right?", {"private_key": 1})
    assert redacted(f"export GITHUB_TOKEN={GITHUB} && git push") == (
        "export GITHUB_TOKEN=[GITHUB_TOKEN] && git push", {"github_token": 1})
    assert redacted(f"the bot uses {SLACK} to post") == ("the bot uses [SLACK_TOKEN] to post", {"slack_token": 1})
    assert redacted("DATABASE_URL=postgres://app:Sup3rS3cret@db.example.com:5432/orders") == (
        "DATABASE_URL=postgres://app:[PASSWORD]@db.example.com:5432/orders", {"password": 1})
    assert redacted("Server=tcp:db;Database=orders;User Id=sa;Password=MyP@ssw0rd;") == (
        "Server=tcp:db;Database=orders;User Id=sa;Password=[PASSWORD];", {"password": 1})
    assert redacted('{"user": "bob", "password": "hunter2", "client_secret": "Zq8x-Lw2v"}') == (
        '{"user": "bob", "password": "[PASSWORD]", "client_secret": "[SECRET]"}', {"password": 1, "secret": 1})
    assert redacted("Your temporary password: Xk9#mP2q and SECRET_KEY=django-insecure-7h3x") == (
        "Your temporary password: [PASSWORD] and SECRET_KEY=[SECRET]", {"password": 1, "secret": 1})
    again, found = redacted(redacted(f"{AWS_ID} {AWS_SECRET} {PEM} password=hunter2")[0])
    assert found == {} and again == "[AWS_ACCESS_KEY] [AWS_SECRET_KEY] [PRIVATE_KEY] password=[PASSWORD]"


@pytest.mark.parametrize("text", CLEAN)
def test_hashes_uuids_base64_data_and_key_words_in_prose_are_not_secrets(text):
    assert redacted(text) == (text, {})


def test_the_screen_passes_over_ordinary_text_and_flags_every_secret():
    """Ordinary prose (the bulk of a dataset) is never handed to the detectors; every secret above is."""
    prose = [f"Ticket {i}: " + qa(i)[0] + ", " + qa(i)[1] for i in range(50)] + [
        "Reach me at jane@example.com or +1 415 555 0100; my keyboard password reset failed: help!"]
    assert not any(secrets.suspect(t) for t in prose)
    for text in (AWS_ID, f"aws_secret_access_key={AWS_SECRET}", PEM, GITHUB, SLACK, "postgres://a:pw12@db/x",
                 "Password=MyP@ss;", 'password: "hunter2"', "password=hunter2"):
        assert secrets.suspect(text), text


def test_every_detect_secrets_plugin_used_finds_its_format():
    """One sample a plugin: the needles each plugin is skipped without must all be in what it finds."""
    hexes, lower = "0123456789abcdef", string.ascii_lowercase + string.digits
    samples = {
        "artifactory_token": f"repo key AKC{tok(60)} ok",
        "aws_access_key": f"id {AWS_ID} ok",
        "azure_storage_key": f"DefaultEndpointsProtocol=https;AccountKey={base64.b64encode(bytes(range(7, 71))).decode()};",
        "password": "https://bob:Tr0ub4dor@example.com/x",
        "cloudant_key": f"cloudant_password = '{hashlib.sha256(b'c').hexdigest()}'",
        "discord_token": "bot MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWs ok",
        "github_token": f"token {GITHUB}",
        "gitlab_token": f"glpat-{tok(20)}",
        "ibm_cloud_key": f"ibm_cloud_iam_key = '{tok(44)}'",
        "ibm_cos_key": f"ibm_cos_secret_access_key = '{tok(48, hexes)}'",
        "jwt": "Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0"
               ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
        "mailchimp_key": f"{tok(32, hexes)}-us13",
        "npm_token": f"//registry.npmjs.org/:_authToken=npm_{tok(36)}",
        "openai_key": f"sk-{tok(20)}T3BlbkFJ{tok(20, seed=1)}",
        "pypi_token": f"pypi-AgEIcHlwaS5vcmc{tok(80)}",
        "sendgrid_key": f"SG.{tok(22)}.{tok(43)}",
        "slack_token": f"https://hooks.slack.com/services/T{tok(8)}/B{tok(8)}/{tok(24)}",
        "softlayer_key": f"softlayer_api_key = '{tok(64, lower)}'",
        "square_secret": f"sq0csp-{tok(43)}",
        "stripe_key": f"sk_live_{tok(24)}",
        "telegram_token": f"bot 110201543:{tok(35)}",
        "twilio_key": f"AC{tok(32, lower)}",
    }
    assert set(samples) == {kind for kind, _ in secrets.PLUGINS.values()}
    for kind, text in samples.items():
        out, found = redacted(text)
        assert found == {kind: 1}, (kind, text, out)


def test_stage1_redacts_secrets_and_counts_them_beside_pii(tmp_path):
    """A small file with credential rows and clean look-alikes: placeholders in the splits, `redactions` by kind,
    a `secrets` cleaning step; a password in a URL is a password, not an e-mail address."""
    secret_rows = [f"aws_access_key_id={AWS_ID}\naws_secret_access_key={AWS_SECRET}", f"Why is this rejected?\n{PEM}",
                   f"git remote set-url origin https://x:{GITHUB}@github.com/o/r", f"slack: {SLACK}",
                   "jdbc:postgresql://db.example.com/orders?user=app&password=Pa55word! fails, mail ops@example.com"]
    rows = [{"prompt": qa(i)[0], "response": qa(i)[1]} for i in range(10)]
    rows += [{"prompt": t, "response": f"Noted, case {i}."} for i, t in enumerate(secret_rows + CLEAN)]
    s = run(write_jsonl(tmp_path / "s.jsonl", rows), tmp_path)
    assert s["redactions"] == {"aws_access_key": 1, "aws_secret_key": 1, "private_key": 1, "github_token": 1,
                               "slack_token": 1, "password": 1, "email": 1}
    assert s["cleaning"]["secrets"] == 5 and s["rows_kept"] == len(rows) and reconciles(s)
    out = {r["messages"][1]["content"]: r["messages"][0]["content"]
           for n in ("train", "val", "test") for r in lines(s["paths"][n])}
    assert out["Noted, case 0."] == "aws_access_key_id=[AWS_ACCESS_KEY]\naws_secret_access_key=[AWS_SECRET_KEY]"
    assert out["Noted, case 1."] == "Why is this rejected?\n[PRIVATE_KEY]"
    assert out["Noted, case 2."] == "git remote set-url origin https://x:[GITHUB_TOKEN]@github.com/o/r"
    assert out["Noted, case 4."] == (
        "jdbc:postgresql://db.example.com/orders?user=app&password=[PASSWORD] fails, mail [EMAIL]")
    for i, text in enumerate(CLEAN, start=len(secret_rows)):
        assert out[f"Noted, case {i}."] == text


def test_recipe_patterns_add_kinds_and_redaction_can_be_turned_off(tmp_path):
    rows = [{"prompt": qa(i)[0], "response": qa(i)[1]} for i in range(8)]
    rows += [{"prompt": f"use itk_{tok(32)} with {GITHUB}", "response": "ok"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    s = run(path, tmp_path, clean={"secret_patterns": {"internal_token": r"itk_[A-Za-z0-9]{32}"}})
    assert s["redactions"] == {"internal_token": 1, "github_token": 1}
    s = run(path, tmp_path, clean={"redact_secrets": False, "secret_patterns": {"internal_token": r"itk_[A-Za-z0-9]{32}"}})
    assert s["redactions"] == {"internal_token": 1}
    texts = [r["messages"][0]["content"] for n in ("train", "val", "test") for r in lines(s["paths"][n])]
    assert f"use [INTERNAL_TOKEN] with {GITHUB}" in texts


def test_a_pattern_that_does_not_compile_is_an_error_naming_the_field(tmp_path, ticket_files):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: x\ndata:\n  path: {ticket_files['tickets']}\n  clean:\n    secret_patterns:\n"
                    f"      vault_token: 'hvs\\.[A-Za-z0-9'\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert f"{path}:5: data.clean.secret_patterns" in msg and "vault_token" in msg and "not a regular expression" in msg
    with pytest.raises(ValueError, match="(?s)pii_patterns.*placeholder kind is letters and underscores"):
        DataConfig.model_validate({"path": str(ticket_files["tickets"]), "clean": {"pii_patterns": {"emp id": "E\\d+"}}})

