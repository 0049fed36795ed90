"""Secret references: a webhook's `secret` or a header value written as where to find it
(`env:NAME`, `file:PATH`, `credential:NAME`) rather than as the secret itself, so that
automation files, and trigd's database, which keeps what the files say, need not hold it.

* `env:NAME` is the environment variable NAME of the trigd process;
* `file:PATH` is the content of the file at the absolute PATH;
* `credential:NAME` is the file NAME in `$CREDENTIALS_DIRECTORY`, where systemd puts what
  `LoadCredential=` / `SetCredential=` give the service.

A file's one trailing newline (LF or CRLF) is not part of the value. Every reference is
resolved when automation files are loaded (`trigd check`, serve, SIGHUP), so one that does
not resolve is a load error; the sender resolves it again for each delivery from the outbox
row, which holds the reference and never the value, so a restart needs no secret at rest
and a rotated file is used from the next attempt on.

These prefixes are reserved: a literal value that starts with one is written with
`literal:` before it (`literal:env:x` is the string `env:x`, `literal:literal:x` is
`literal:x`). Messages name the reference and why it failed, never a value.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final

SCHEMES: Final = ("env", "file", "credential")
LITERAL: Final = "literal:"
CREDENTIALS_DIRECTORY: Final = "CREDENTIALS_DIRECTORY"
MAX_REFERENCED_BYTES: Final = 65_536
"""A file or credential larger than this is refused: no secret or header is that big, and
a mistaken `file:/dev/zero` must not eat the daemon's memory."""


class UnresolvedReference(ValueError):
    """A reference that names nothing usable; the message names it and says why."""


def is_reference(text: str) -> bool:
    """Whether `text` is resolved rather than used as written (`literal:` included)."""
    scheme, colon, _ = text.partition(":")
    return bool(colon) and (scheme in SCHEMES or text.startswith(LITERAL))


def resolve(text: str, environ: Mapping[str, str]) -> str:
    """The value `text` stands for: itself unless it is a reference. `environ` is the
    process environment (the variables, and `$CREDENTIALS_DIRECTORY`)."""
    if text.startswith(LITERAL):
        return text[len(LITERAL) :]
    scheme, colon, name = text.partition(":")
    if not colon or scheme not in SCHEMES:
        return text
    if scheme == "env":
        if not name:
            raise UnresolvedReference(f"{text!r} names no environment variable")
        value = environ.get(name)
        if value is None:
            raise UnresolvedReference(f"{text!r}: the environment variable {name} is not set")
    elif scheme == "file":
        path = Path(name)
        if not path.is_absolute():
            raise UnresolvedReference(f"{text!r}: a file: reference needs an absolute path")
        value = _read(path, text)
    else:
        directory = environ.get(CREDENTIALS_DIRECTORY)
        if not directory:
            raise UnresolvedReference(
                f"{text!r}: $CREDENTIALS_DIRECTORY is not set (systemd sets it for a service "
                "with LoadCredential=)"
            )
        if not name or "/" in name or name in (".", ".."):
            raise UnresolvedReference(f"{text!r}: a credential name is a plain file name")
        value = _read(Path(directory) / name, text)
    if not value:
        raise UnresolvedReference(f"{text!r} is empty")
    return value


def _read(path: Path, text: str) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_REFERENCED_BYTES + 1)
    except OSError as exc:
        why = exc.strerror.lower() if exc.strerror else type(exc).__name__
        raise UnresolvedReference(f"{text!r} cannot be read: {why}") from None
    if len(data) > MAX_REFERENCED_BYTES:
        raise UnresolvedReference(f"{text!r} is larger than {MAX_REFERENCED_BYTES} bytes")
    try:
        value = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UnresolvedReference(f"{text!r} is not UTF-8 text") from None
    if value.endswith("\r\n"):
        return value[:-2]
    return value.removesuffix("\n")
