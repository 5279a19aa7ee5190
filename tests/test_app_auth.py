"""The app on a network: logins (--auth, --auth_file with plain or PBKDF2-hashed lines), and the refusal to
serve a non-loopback address or --share without them. Servers in tests bind 127.0.0.1 only: the refusals
happen before anything binds."""
import urllib.error
import urllib.request

import pytest

from app.__main__ import main
from app.auth import (
    AuthError,
    check_password,
    checker,
    exposure_error,
    hash_password,
    is_loopback,
    logins_from_flags,
    read_auth_file,
)

from .test_app_support import running_app

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402


def test_hashed_and_plain_passwords():
    stored = hash_password("s3cret", iterations=1000, salt=bytes(range(16)))
    assert stored.startswith("pbkdf2_sha256:1000:000102030405060708090a0b0c0d0e0f:")
    assert len(stored.split(":")[3]) == 64
    assert check_password("s3cret", stored) and not check_password("s3cret ", stored)
    assert hash_password("s3cret", iterations=1000) != stored            # a fresh salt each time
    assert check_password("plain", "plain") and not check_password("Plain", "plain")
    allowed = checker({"alice": stored, "bob": "pw"})
    assert allowed("alice", "s3cret") and allowed("bob", "pw")
    assert not allowed("alice", "pw") and not allowed("carol", "s3cret") and not allowed("bob", "")


def test_auth_file_lines_and_their_errors(tmp_path):
    good = tmp_path / "logins.txt"
    good.write_text(f"# team\n\nalice:{hash_password('a', iterations=1000)}\nbob:pass:with:colons\n")
    logins = read_auth_file(good)
    assert sorted(logins) == ["alice", "bob"] and logins["bob"] == "pass:with:colons"
    assert checker(logins)("alice", "a") and checker(logins)("bob", "pass:with:colons")
    cases = {"nocolon\n": "line 1: expected user:password", "x:pbkdf2_sha256:10:zz:00\n": "line 1: a hashed password",
             "# only a comment\n": "holds no login", ":pw\n": "expected user:password"}
    for text, expected in cases.items():
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(AuthError, match=expected):
            read_auth_file(bad)
    with pytest.raises(AuthError, match="cannot read it"):
        read_auth_file(tmp_path / "missing.txt")
    assert logins_from_flags(["carol:x"], str(good))["carol"] == "x"


def test_loopback_needs_no_login_and_anything_exposed_does():
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host) and exposure_error(host, False, False, False) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "myhost.example"):
        assert not is_loopback(host)
        message = exposure_error(host, False, False, False)
        assert f"--host {host}" in message and "--auth USER:PASSWORD" in message and "--insecure_no_auth" in message
        assert exposure_error(host, False, True, False) is None and exposure_error(host, False, False, True) is None
    assert "--share" in exposure_error("127.0.0.1", True, False, False)


@pytest.mark.parametrize("flags", [["--host", "0.0.0.0"], ["--share"], ["--host", "10.1.2.3", "--share"]])
def test_an_exposed_app_without_logins_refuses_to_start(tmp_path, capsys, flags):
    runs = tmp_path / "runs"
    assert main([*flags, "--runs_dir", str(runs), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--auth_file FILE" in err[0]
    assert not runs.exists()                                          # refused before anything was made


def test_a_bad_auth_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "logins.txt"
    bad.write_text("alice\n")
    assert main(["--auth_file", str(bad), "--runs_dir", str(tmp_path / "runs"), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --auth_file {bad} line 1")


def test_with_logins_the_api_needs_them(tmp_path):
    logins = tmp_path / "logins.txt"
    logins.write_text(f"alice:{hash_password('wonderland', iterations=1000)}\n")
    with running_app(tmp_path / "runs", auth_file=logins, auth="bob:builder") as (url, _):
        with pytest.raises(Exception, match="credentials were not provided"):
            Client(url, verbose=False)
        for credentials in (("alice", "wrong"), ("mallory", "wonderland"), ("bob", "wonderland")):
            with pytest.raises(ValueError, match="Could not login"):
                Client(url, auth=credentials, verbose=False)
        for path in ("config", "gradio_api/info"):                 # the raw API too, not just the page
            with pytest.raises(urllib.error.HTTPError, match="401"):
                urllib.request.urlopen(url + path, timeout=30)
        for credentials in (("alice", "wonderland"), ("bob", "builder")):
            chosen, _ = Client(url, auth=credentials, verbose=False).predict(api_name="/runs")
            assert chosen["choices"] == []
