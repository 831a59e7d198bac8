"""Reviewers of the review page: a YAML file of ``name: bcrypt-hash`` lines, and a tool to add one.

Why a file and bcrypt: the node has no directory service to lean on, a site has a handful
of physicists, and a file readable by the node's user only is easy to audit and to manage
with configuration tools.  bcrypt (cost 12) makes a stolen file expensive to crack.  The
file is read at every login, so adding or removing a reviewer needs no restart.

Add or change a reviewer (asks for the password twice)::

    python -m rtcontrast.node.review.users --file /etc/rtcontrast/reviewers.yaml add "Dr A Physicist"
    python -m rtcontrast.node.review.users --file /etc/rtcontrast/reviewers.yaml remove "Dr A Physicist"
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

import bcrypt
import yaml

from rtcontrast.node.ops.holds import check_reviewer

__all__ = ["UsersFileError", "hash_password", "load_users", "main", "verify_password"]

#: bcrypt compares at most 72 bytes; a longer password would be silently truncated.
MAX_PASSWORD_BYTES = 72
MIN_PASSWORD_CHARS = 10
#: Compared against when the name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = bcrypt.hashpw(b"rtcontrast-no-such-user", bcrypt.gensalt(rounds=12))


class UsersFileError(ValueError):
    """The users file is unreadable or malformed (the message says where)."""


def load_users(path: Path) -> dict[str, bytes]:
    """Reviewer name -> bcrypt hash from ``path``; raises :class:`UsersFileError` when it is wrong."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsersFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise UsersFileError(f"{path}: not YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsersFileError(f"{path}: expected 'name: bcrypt-hash' lines")
    users: dict[str, bytes] = {}
    for name, hashed in data.items():
        try:
            clean = check_reviewer(str(name))
        except ValueError as exc:
            raise UsersFileError(f"{path}: {name!r}: {exc}") from exc
        if not isinstance(hashed, str) or not hashed.startswith(("$2b$", "$2a$", "$2y$")):
            raise UsersFileError(f"{path}: {clean!r}: the value is not a bcrypt hash (use this module's 'add')")
        users[clean] = hashed.encode("ascii")
    return users


def hash_password(password: str) -> str:
    """A bcrypt hash (cost 12) of ``password``; ValueError when it is too short or too long for bcrypt."""
    raw = password.encode("utf-8")
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"a password has at least {MIN_PASSWORD_CHARS} characters")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise ValueError(f"bcrypt uses at most {MAX_PASSWORD_BYTES} bytes of a password; choose a shorter one")
    return bcrypt.hashpw(raw, bcrypt.gensalt(rounds=12)).decode("ascii")


def verify_password(users: dict[str, bytes], name: str, password: str) -> bool:
    """True when ``name`` is a reviewer and ``password`` matches; the same work either way."""
    raw = password.encode("utf-8")
    hashed = users.get(" ".join(name.split()))
    if len(raw) > MAX_PASSWORD_BYTES or not raw:
        bcrypt.checkpw(b"x", _DUMMY_HASH)
        return False
    try:
        ok = bcrypt.checkpw(raw, hashed if hashed is not None else _DUMMY_HASH)
    except ValueError:
        return False
    return ok and hashed is not None


def _write(path: Path, users: dict[str, str]) -> None:
    text = "# rtcontrast review page: reviewer name -> bcrypt hash (python -m rtcontrast.node.review.users)\n"
    text += yaml.safe_dump(users, sort_keys=True, allow_unicode=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Add, change or remove a reviewer in a users file (the password is asked for, never an argument)."""
    p = argparse.ArgumentParser(prog="python -m rtcontrast.node.review.users", description=__doc__.split("\n")[0])
    p.add_argument("--file", type=Path, required=True, help="the users file (review.users_file in node.yaml)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    p.add_argument("action", choices=["add", "remove"])
    p.add_argument("name", help="the reviewer's name as it appears in the audit and the DICOM")
    a = p.parse_args(argv)
    try:
        name = check_reviewer(a.name)
        users = {k: v.decode("ascii") for k, v in load_users(a.file).items()} if a.file.exists() else {}
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if a.action == "remove":
        if users.pop(name, None) is None:
            print(f"no reviewer {name!r} in {a.file}", file=sys.stderr)
            return 1
        _write(a.file, users)
        print(f"removed {name!r} from {a.file}")
        return 0
    if a.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            print("the passwords differ", file=sys.stderr)
            return 1
    existed = name in users
    try:
        users[name] = hash_password(password)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    _write(a.file, users)
    print(f"{'changed' if existed else 'added'} {name!r} in {a.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
