"""Who may use the app: logins for Gradio's `auth=`, and the rule that an app reachable from other machines
must have them (it starts training processes and writes files on this machine).

    python -m app --host 0.0.0.0 --auth alice:s3cret                 # one login on the command line
    python -m app --host 0.0.0.0 --auth_file logins.txt              # one login a line
    python -m app.auth alice >> logins.txt                           # asks for a password, prints a hashed line

A --auth_file line is `user:password` (plain text) or `user:pbkdf2_sha256:<iterations>:<salt hex>:<hash hex>`
(PBKDF2-HMAC-SHA256, what `python -m app.auth` writes: the file then holds no password). Blank lines and
lines starting with # are skipped. Passwords are compared in constant time (hmac.compare_digest).
"""
from __future__ import annotations

import getpass
import hashlib
import hmac
import ipaddress
import os
import sys
from collections.abc import Callable
from pathlib import Path

SCHEME = "pbkdf2_sha256"
ITERATIONS = 600_000   # OWASP's 2023 figure for PBKDF2-HMAC-SHA256; about 0.3 s per login check on one core
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


class AuthError(ValueError):
    """A bad --auth value or --auth_file line (one-line message)."""


def hash_password(password: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """`pbkdf2_sha256:<iterations>:<salt hex>:<hash hex>` of a password (a fresh random salt by default)."""
    salt = salt if salt is not None else os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{SCHEME}:{iterations}:{salt.hex()}:{digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    """Does `password` match `stored` (plain text, or a hash_password string)?"""
    if stored.startswith(SCHEME + ":"):
        _, iterations, salt, digest = stored.split(":")
        got = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations))
        return hmac.compare_digest(got, bytes.fromhex(digest))
    return hmac.compare_digest(password.encode(), stored.encode())


def parse_login(text: str, where: str = "--auth") -> tuple[str, str]:
    """`user:secret` -> (user, secret), checking a hashed secret's shape."""
    user, sep, secret = text.strip().partition(":")
    if not sep or not user or not secret:
        raise AuthError(f"{where}: expected user:password, got {text.strip()[:40]!r}")
    if secret.startswith(SCHEME + ":"):
        parts = secret.split(":")
        try:
            ok = len(parts) == 4 and int(parts[1]) > 0 and len(bytes.fromhex(parts[2])) > 0 \
                and len(bytes.fromhex(parts[3])) == 32
        except ValueError:
            ok = False
        if not ok:
            raise AuthError(f"{where}: a hashed password must be {SCHEME}:<iterations>:<salt hex>:<hash hex> "
                            f"(as `python -m app.auth {user}` prints)")
    return user, secret


def read_auth_file(path: str | os.PathLike) -> dict[str, str]:
    """{user: stored secret} from an --auth_file; AuthError naming the file and line when it is unusable."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AuthError(f"--auth_file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    logins = {}
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            user, secret = parse_login(line, f"--auth_file {path} line {i}")
            logins[user] = secret
    if not logins:
        raise AuthError(f"--auth_file {path} holds no login (expected user:password lines)")
    return logins


def logins_from_flags(auth: list[str] | None, auth_file: str | None) -> dict[str, str]:
    logins = {}
    if auth_file:
        logins.update(read_auth_file(auth_file))
    for value in auth or []:
        user, secret = parse_login(value)
        logins[user] = secret
    return logins


def checker(logins: dict[str, str]) -> Callable[[str, str], bool]:
    """Gradio's auth callable: (username, password) -> allowed."""
    def allowed(username: str, password: str) -> bool:
        stored = logins.get(username)
        if stored is None:
            check_password(password, hash_password("", iterations=1000))   # similar work for unknown users
            return False
        return check_password(password, stored)
    return allowed


def is_loopback(host: str) -> bool:
    """Only this machine can connect: 127.0.0.0/8, ::1, localhost. Anything else (0.0.0.0, a LAN address, a
    host name) is treated as exposed."""
    host = (host or "").strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_error(host: str, share: bool, has_auth: bool, insecure: bool) -> str | None:
    """The one-line refusal for an exposed app without logins, or None when it may start."""
    if has_auth or insecure or (is_loopback(host) and not share):
        return None
    where = "--share (a public gradio.live link)" if share else f"--host {host} (reachable from other machines)"
    return (f"{where} needs a login: the app starts training processes and writes files on this machine. Add "
            f"--auth USER:PASSWORD or --auth_file FILE (hashed lines: python -m app.auth USER >> FILE), or "
            f"--insecure_no_auth if a proxy in front of the app authenticates users")


def main(argv: list[str] | None = None) -> int:
    """python -m app.auth USER: ask for a password twice and print the --auth_file line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0] or ":" in argv[0] or argv[0].startswith("-"):
        print("error: usage: python -m app.auth USER (prints USER:pbkdf2_sha256:... for --auth_file)",
              file=sys.stderr)
        return 2
    password = getpass.getpass(f"password for {argv[0]}: ")
    if not password or password != getpass.getpass("again: "):
        print("error: the passwords are empty or differ", file=sys.stderr)
        return 2
    print(f"{argv[0]}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
