"""agent/logs.py: secret redaction and the journald-prefixed JSON lines on stderr."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from agent.logs import REDACTED, redact_secrets, setup_logging

PEM_BODY = "MIIEowIBAAKCAQEAsEcr3tK3yMat3r1al0nlyF0rTh1sT3st"
RSA_PEM = f"-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\n-----END RSA PRIVATE KEY-----"


def redact(**event: Any) -> dict[str, Any]:
    return dict(redact_secrets(None, "info", dict(event)))


# --------------------------------------------------------------------------- redact_secrets


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "token",
        "authorization",
        "auth_config",
        "private_key",
        "auth",
        "Password",
        "AUTHORIZATION",
        "registry_password",
        "passwd",
        "client_secret",
        "credentials",
        "privateKey",
        "identitytoken",
    ],
)
def test_top_level_secret_keys(key: str) -> None:
    event = redact(event="login", **{key: "hunter2"}, user="bob")
    assert event[key] == REDACTED
    assert event["user"] == "bob"
    assert event["event"] == "login"


@pytest.mark.parametrize("value", [{"a": 1}, ["hunter2"], 12345, None, b"hunter2"])
def test_secret_keys_redact_any_value(value: Any) -> None:
    assert redact(token=value)["token"] == REDACTED


def test_plain_values_untouched() -> None:
    event = {"event": "upgrade done", "job": "job-1", "version": "v1.13.0", "count": 3,
             "ratio": 0.5, "ok": True, "nothing": None, "path": "/etc/kubeedge/backup"}
    assert redact(**event) == event


def test_nested_dicts_and_lists() -> None:
    event = redact(
        event="pull",
        request={
            "registry": {"username": "bob", "password": "hunter2", "Auth": "Ym9iOmh1bnRlcjI="},
            "items": [{"token": "tok-1", "name": "a"}, "plain", ("t", {"secret": "s"})],
            "level": {"deeper": {"private_key": "pk", "keep": "me"}},
        },
    )
    request = event["request"]
    assert request["registry"] == {"username": "bob", "password": REDACTED, "Auth": REDACTED}
    assert request["items"][0] == {"token": REDACTED, "name": "a"}
    assert request["items"][1] == "plain"
    assert request["items"][2] == ["t", {"secret": REDACTED}]
    assert request["level"]["deeper"] == {"private_key": REDACTED, "keep": "me"}
    text = json.dumps(event)
    for secret in ("hunter2", "Ym9iOmh1bnRlcjI=", "tok-1", '"s"', '"pk"'):
        assert secret not in text


@pytest.mark.parametrize(
    "kind", ["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY",
             "ENCRYPTED PRIVATE KEY"],
)
def test_pem_private_keys_in_strings(kind: str) -> None:
    pem = f"-----BEGIN {kind}-----\n{PEM_BODY}\nabc+/=\n-----END {kind}-----"
    event = redact(event=f"read key: {pem} from /etc/kubeedge/certs", detail=[f"x{pem}y"],
                   nested={"stderr": f"\n{pem}\n"})
    assert event["event"] == f"read key: {REDACTED} from /etc/kubeedge/certs"
    assert event["detail"] == [f"x{REDACTED}y"]
    assert event["nested"] == {"stderr": f"\n{REDACTED}\n"}
    assert PEM_BODY not in json.dumps(event)


def test_two_pem_keys_keep_text_between() -> None:
    event = redact(event=f"{RSA_PEM} and then {RSA_PEM}")
    assert event["event"] == f"{REDACTED} and then {REDACTED}"


def test_certificates_are_not_secrets() -> None:
    cert = "-----BEGIN CERTIFICATE-----\nMIIBcert\n-----END CERTIFICATE-----"
    assert redact(event=cert)["event"] == cert


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://user:pw@host", f"https://user:{REDACTED}@host"),
        ("pulling https://bob:s3cr3t@registry.example:5000/v2/kubeedge",
         f"pulling https://bob:{REDACTED}@registry.example:5000/v2/kubeedge"),
        ("a http://u:p@h1/x b mqtt://v:q:r@h2:1883",
         f"a http://u:{REDACTED}@h1/x b mqtt://v:{REDACTED}@h2:1883"),
        ("https://registry.example:5000/v2/", "https://registry.example:5000/v2/"),
        ("https://host/a@b", "https://host/a@b"),
        ("user@example.com", "user@example.com"),
    ],
)
def test_url_credentials(text: str, expected: str) -> None:
    event = redact(event=text, nested={"urls": [text]})
    assert event["event"] == expected
    assert event["nested"] == {"urls": [expected]}


def test_url_password_without_user() -> None:
    assert "hunter2" not in redact(event="connect redis://:hunter2@cache:6379")["event"]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == ""  # logs never go to stdout
    return captured.err.splitlines()


def test_json_line_is_redacted_with_info_priority(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", json_output=True)  # binds to the captured sys.stderr
    structlog.get_logger().info(
        "registry login",
        password="hunter2",
        registry="https://bob:s3cr3t@registry.example/v2",
        docker={"auth_config": {"username": "bob", "password": "x-hunter3"}},
        key=RSA_PEM,
        job="job-1",
    )
    (line,) = lines(capsys)
    assert line.startswith("<6>{")
    for secret in ("hunter2", "s3cr3t", "x-hunter3", PEM_BODY):
        assert secret not in line
    data = json.loads(line[3:])
    assert data["event"] == "registry login"
    assert data["level"] == "info"
    assert data["password"] == REDACTED
    assert data["registry"] == f"https://bob:{REDACTED}@registry.example/v2"
    assert data["docker"] == {"auth_config": REDACTED}
    assert data["key"] == REDACTED
    assert data["job"] == "job-1"
    assert "timestamp" in data


def test_priorities_and_level_filter(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", json_output=True)  # binds to the captured sys.stderr
    log = structlog.get_logger()
    log.debug("hidden at info level")
    log.info("i")
    log.warning("w")
    log.error("e", token="hunter2")
    log.critical("c")
    out = lines(capsys)
    assert [line[:4] for line in out] == ["<6>{", "<4>{", "<3>{", "<2>{"]
    assert [json.loads(line[3:])["event"] for line in out] == ["i", "w", "e", "c"]
    assert "hunter2" not in "\n".join(out)


def test_exception_log_is_error_and_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", json_output=True)  # binds to the captured sys.stderr
    try:
        raise RuntimeError("login to https://bob:s3cr3t@registry.example failed")
    except RuntimeError:
        structlog.get_logger().exception("pull failed", password="hunter2")
    (line,) = lines(capsys)
    assert line.startswith("<3>{")
    assert "s3cr3t" not in line
    assert "hunter2" not in line
    data = json.loads(line[3:])
    assert data["level"] == "error"
    assert "RuntimeError" in json.dumps(data["exception"])


def _fail_with_headers() -> None:
    headers = {"Authorization": "Bearer tok-s3cr3t-in-locals"}
    raise RuntimeError(f"request with {len(headers)} headers failed")


def test_exception_locals_do_not_leak(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", json_output=True)  # binds to the captured sys.stderr
    try:
        _fail_with_headers()
    except RuntimeError:
        structlog.get_logger().exception("request failed")
    (line,) = lines(capsys)
    assert line.startswith("<3>{")
    assert "tok-s3cr3t-in-locals" not in line


def test_json_output_defaults_to_non_tty(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("warning")  # capsys's stderr is not a TTY -> JSON
    log = structlog.get_logger()
    log.info("filtered")
    log.warning("shown", secret="hunter2")
    (line,) = lines(capsys)
    assert line.startswith("<4>{")
    assert json.loads(line[3:])["secret"] == REDACTED
