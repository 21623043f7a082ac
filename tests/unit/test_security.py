"""Tokens, TLS settings, secret files and Redis URLs: pure code, nothing running."""

from __future__ import annotations

import stat

import pytest
from pydantic import ValidationError

from moefleet.core.config import RouterConfig
from moefleet.core.secrets import SecretFileError, read_secret_file, redact_url, write_private_file
from moefleet.core.state import resolve_redis_url
from moefleet.router_service import security


def test_bearer_check_accepts_only_the_exact_token():
    token = "s3cret-token"
    assert security.check_bearer([("authorization", "Bearer s3cret-token")], token) is None
    assert security.check_bearer([("authorization", "bearer s3cret-token")], token) is None  # scheme is case-insensitive
    assert security.check_bearer([("x", "y"), ("authorization", b"Bearer s3cret-token")], token) is None
    for metadata in ([], [("authorization", "Bearer s3cret-toke")], [("authorization", "Bearer s3cret-token2")],
                     [("authorization", "s3cret-token")], [("authorization", "Basic s3cret-token")],
                     [("authorization", "Bearer ")], [("x-token", "Bearer s3cret-token")]):
        why = security.check_bearer(metadata, token)
        assert why is not None and token not in why, metadata
    assert "missing" in security.check_bearer([], token)
    assert "invalid" in security.check_bearer([("authorization", "Bearer nope")], token)


def test_token_comes_from_the_file_then_the_environment(tmp_path):
    f = tmp_path / "token"
    f.write_text("  from-file\n")
    assert security.load_token(str(f), {security.AUTH_TOKEN_ENV: "from-env"}) == "from-file"
    assert security.load_token(None, {security.AUTH_TOKEN_ENV: " from-env "}) == "from-env"
    assert security.load_token(None, {}) is None
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(security.SecurityConfigError, match="auth_token_file.*empty"):
        security.load_token(str(empty), {})
    with pytest.raises(security.SecurityConfigError, match="auth_token_file.*cannot read"):
        security.load_token(str(tmp_path / "missing"), {})


def test_authentication_is_required_beyond_loopback_unless_turned_off():
    assert [security.is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost")] == [True] * 5
    assert [security.is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com")] == [False] * 4
    assert not security.auth_required(RouterConfig())
    assert security.auth_required(RouterConfig(host="0.0.0.0"))
    assert not security.auth_required(RouterConfig(host="0.0.0.0", require_auth=False))
    assert security.auth_required(RouterConfig(require_auth=True))
    with pytest.raises(security.SecurityConfigError, match="MOEFLEET_AUTH_TOKEN"):
        security.resolve_token(RouterConfig(host="0.0.0.0"), {})
    with pytest.raises(security.SecurityConfigError):
        security.resolve_token(RouterConfig(require_auth=True), {})
    assert security.resolve_token(RouterConfig(host="0.0.0.0"), {security.AUTH_TOKEN_ENV: "t"}) == "t"
    assert security.resolve_token(RouterConfig(), {}) is None


def test_router_config_names_inconsistent_tls_and_limits():
    with pytest.raises(ValidationError, match="tls_cert"):
        RouterConfig(tls_cert="/c.pem")
    with pytest.raises(ValidationError, match="tls_cert"):
        RouterConfig(tls_key="/k.pem")
    with pytest.raises(ValidationError, match="tls_client_ca"):
        RouterConfig(tls_client_ca="/ca.pem")
    with pytest.raises(ValidationError, match="max_request_tokens"):
        RouterConfig(max_request_tokens=100, max_inflight_tokens=50)
    with pytest.raises(ValidationError, match="max_message_bytes"):
        RouterConfig(max_message_bytes=2 << 20, max_inflight_bytes=1 << 20)
    RouterConfig(tls_cert="/c.pem", tls_key="/k.pem", tls_client_ca="/ca.pem")


def test_tls_files_that_are_missing_or_not_pem_are_named(tmp_path):
    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("hello")
    cfg = RouterConfig(tls_cert=str(not_pem), tls_key=str(tmp_path / "absent.pem"))
    with pytest.raises(security.SecurityConfigError, match="tls_cert: .* is not PEM"):
        security.server_credentials(cfg)
    with pytest.raises(security.SecurityConfigError, match="tls_ca: cannot read"):
        security.channel_credentials(str(tmp_path / "absent.pem"))
    with pytest.raises(security.SecurityConfigError, match="together"):
        security.channel_credentials(None, tls_cert=str(not_pem))
    assert security.server_credentials(RouterConfig()) is None


def test_private_files_are_created_for_their_owner_only(tmp_path):
    path = tmp_path / "sub" / "secret"
    write_private_file(path, "pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "pw"
    path.chmod(0o644)
    write_private_file(path, "pw2")  # an existing, looser file is tightened
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == "pw2"
    assert read_secret_file(path, "x", private=True) == "pw2"
    path.chmod(0o640)
    with pytest.raises(SecretFileError, match="readable by other users") as e:
        read_secret_file(path, "x", private=True)
    assert "pw2" not in str(e.value)


def test_urls_are_redacted_and_redis_passwords_are_added_quoted(tmp_path):
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("rediss://user:pw@h:6380/1?ssl_ca_certs=/ca") == "rediss://user:***@h:6380/1?ssl_ca_certs=/ca"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    env = {"MOEFLEET_REDIS_URL": "rediss://h:6380/0?ssl_ca_certs=/ca.pem", "REDIS_PASSWORD": "p@ss:w/rd"}
    url = resolve_redis_url(None, env)
    assert url == "rediss://:p%40ss%3Aw%2Frd@h:6380/0?ssl_ca_certs=/ca.pem"
    from urllib.parse import unquote, urlsplit

    assert unquote(urlsplit(url).password) == "p@ss:w/rd"
    assert resolve_redis_url("redis://:given@h/0", {"REDIS_PASSWORD": "other"}) == "redis://:given@h/0"
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    assert resolve_redis_url("redis://u@h/0", {"MOEFLEET_REDIS_PASSWORD_FILE": str(f)}) == "redis://u:from-file@h/0"
    with pytest.raises(ValueError, match="MOEFLEET_REDIS_URL"):
        resolve_redis_url(None, {})
    with pytest.raises(ValueError, match="not a redis://") as e:
        resolve_redis_url("http://:hunter2@h/0", {})
    assert "hunter2" not in str(e.value)

