"""The coordinator's credentials: three scoped tokens, optional API keys, and who may do what.

Every token has the shape ``swarm1.<CA fingerprint>.<secret>`` (swarm/certs.py), so whichever
one a user pastes also pins the coordinator's CA; the three secrets differ:

- **join** (``token=`` in the READY line): nodes register with it (``Register``). Nothing else:
  volunteers hold it, so it neither reads the swarm's state nor changes what the swarm runs.
- **admin** (``admin_token=``): changes what the swarm runs (submit, resume, cancel, serve,
  unserve) and reads everything.
- **read** (``read_token=``): reads (status, jobs, models, generation, ``/api``, ``/metrics``,
  the status page, ``/v1`` when no API keys are configured).

``swarm1.<fingerprint>`` alone is no credential: it verifies the coordinator, and reads only what
``--public-status`` makes public. ``/v1`` takes API keys (``--api-key``, ``--api-keys-file``, one
per line) instead of tokens when any are configured.

Storage: the secrets live in SQLite (``meta``: ``join_token``, ``admin_token``, ``read_token``),
the source of truth; the full tokens are also written 0600 to the state dir (``token`` for the
join token, whose bare secret stays in ``join_token`` as before; ``admin_token``, ``read_token``)
for operators and scripts. Rotation (:func:`rotate`, ``swarm-coordinator rotate-token``) writes a
new secret to both, the files last; a running coordinator stats those files on every check and
re-reads SQLite when one changed (:meth:`Credentials.refresh`), so the old token is refused from
the next call on, without a restart. Sessions of nodes already registered are not tokens and
stay valid.

The decisions (:func:`read_access`, :func:`admin_access`, :func:`api_access`) are pure: they take
the kind of credential presented and the coordinator's settings and return an :class:`Access` or
raise AuthError / PermissionDeniedError with a message saying what to pass instead.
"""

from __future__ import annotations

import enum
import hmac
import logging
import os
import secrets
import threading
from collections.abc import Iterable, Mapping
from contextlib import closing
from pathlib import Path

from swarm import certs
from swarm.errors import AuthError, ConfigError, PermissionDeniedError
from swarm.transport.auth import MAX_API_TOKEN_CHARS

log = logging.getLogger(__name__)

JOIN, ADMIN, READ = "join", "admin", "read"
KINDS: tuple[str, ...] = (JOIN, ADMIN, READ)
META_KEYS = {JOIN: "join_token", ADMIN: "admin_token", READ: "read_token"}
# Full tokens, for operators (the join token keeps its old file name: nodes' scripts read it).
TOKEN_FILES = {JOIN: "token", ADMIN: "admin_token", READ: "read_token"}
JOIN_SECRET_FILE = "join_token"  # the join token's bare secret, as before scoped tokens
FLAGS = {JOIN: "--token", ADMIN: "--admin-token", READ: "--read-token"}
READY_FIELDS = {JOIN: "token", ADMIN: "admin_token", READ: "read_token"}  # READY line / serve output
MAX_API_KEY_CHARS = 200


class Access(enum.Enum):
    """What a caller may see: FULL (a read or admin credential, or an API key) or PUBLIC (no
    credential, ``--public-status``: no peer addresses, no job assignments)."""

    FULL = "full"
    PUBLIC = "public"


# ----------------------------------------------------------------------------- secrets on disk
def new_secret() -> str:
    # Hex, not urlsafe base64: a token starting with '-' would be read as a flag by argparse CLIs.
    return secrets.token_hex(24)


def check_secret(secret: str, flag: str) -> str:
    if not (16 <= len(secret) <= 200 and secret.isprintable()):
        raise ConfigError(f"{flag} must be 16..200 printable characters")
    return secret


def given_secret(given: str | None, fingerprint: str, flag: str) -> str | None:
    """The secret of a value given by flag: a bare secret, or a full token of this CA (pasted
    back); a swarm1 token of another CA raises ConfigError."""
    if given is None:
        return None
    if certs.is_token(given):
        parsed = certs.parse_token(given)
        if parsed.fingerprint != fingerprint or not parsed.secret:
            raise ConfigError(f"{flag} is a swarm1 token of another CA; pass only its secret (the part after the "
                              "last dot) or the token this coordinator printed")
        given = parsed.secret
    return check_secret(given, flag)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (0600) atomically: readers (a running coordinator) see the old
    file or the new one, and a new inode tells them it changed."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _stored_secrets(db) -> dict[str, str]:
    with closing(db.connect()) as conn:
        rows = conn.execute("SELECT key, value FROM meta WHERE key IN (?, ?, ?)", tuple(META_KEYS.values())).fetchall()
    by_key = dict(rows)
    return {kind: by_key[key] for kind, key in META_KEYS.items() if by_key.get(key)}


def _store(db, state_dir: Path, fingerprint: str, secrets_by_kind: Mapping[str, str]) -> dict[str, str]:
    """Write the secrets to SQLite, then the token files; returns the full tokens by kind."""
    with closing(db.connect()) as conn, conn:
        conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         [(META_KEYS[k], s) for k, s in secrets_by_kind.items()])
    tokens = {k: certs.format_token(fingerprint, s) for k, s in secrets_by_kind.items()}
    if JOIN in secrets_by_kind:
        _write_private(Path(state_dir) / JOIN_SECRET_FILE, secrets_by_kind[JOIN] + "\n")
    for kind, token in tokens.items():
        _write_private(Path(state_dir) / TOKEN_FILES[kind], token + "\n")
    return tokens


def _check_distinct(secrets_by_kind: Mapping[str, str]) -> None:
    seen: dict[str, str] = {}
    for kind, secret in secrets_by_kind.items():
        if secret in seen:
            raise ConfigError(f"the {kind} token and the {seen[secret]} token must differ ({FLAGS[kind]} and "
                              f"{FLAGS[seen[secret]]} were given the same secret)")
        seen[secret] = kind


def load_or_create(db, state_dir: Path, fingerprint: str, given: Mapping[str, str | None] | None = None
                   ) -> dict[str, str]:
    """The full tokens by kind: for each kind the secret given (flag), else the stored one
    (SQLite, or for the join token the file of a coordinator from before SQLite kept it), else a
    new one. Stores them (SQLite and files, 0600). Raises ConfigError for a bad or shared secret."""
    given = dict(given or {})
    stored = _stored_secrets(db)
    out: dict[str, str] = {}
    for kind in KINDS:
        secret = given_secret(given.get(kind), fingerprint, FLAGS[kind])
        if secret is None:
            secret = stored.get(kind)
        if secret is None and kind == JOIN:
            legacy = Path(state_dir) / JOIN_SECRET_FILE
            secret = (legacy.read_text().strip() or None) if legacy.exists() else None
        out[kind] = secret or new_secret()
    _check_distinct(out)
    return _store(db, state_dir, fingerprint, out)


def join_secret(db, state_dir: Path, given: str | None = None) -> str:
    """Only the join token's secret (given, else stored, else new), kept in SQLite and the
    ``join_token`` file; for callers that need no CA (the full tokens: :func:`load_or_create`)."""
    secret = given or _stored_secrets(db).get(JOIN)
    legacy = Path(state_dir) / JOIN_SECRET_FILE
    if secret is None and legacy.exists():
        secret = legacy.read_text().strip() or None
    secret = secret or new_secret()
    with closing(db.connect()) as conn, conn:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (META_KEYS[JOIN], secret))
    _write_private(legacy, secret + "\n")
    return secret


def rotate(db, state_dir: Path, fingerprint: str, kind: str, secret: str | None = None) -> str:
    """Replace the ``kind`` token by one with ``secret`` (default: a new one); returns it. A
    running coordinator of this state dir refuses the old token from its next check on."""
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(KINDS)}")
    secret = given_secret(secret, fingerprint, "--secret") or new_secret()
    current = _stored_secrets(db)
    _check_distinct({**current, kind: secret})
    return _store(db, state_dir, fingerprint, {kind: secret})[kind]


# ----------------------------------------------------------------------------- the running coordinator's view
class Credentials:
    """The current tokens and API keys of a running coordinator. Thread-safe.

    :meth:`kind_of` says which token a presented string is (constant-time comparisons); it
    first calls :meth:`refresh`, which stats the token files (and the API keys file) and reloads
    what changed: a rotation is seen on the next call, without a restart."""

    def __init__(self, db, state_dir: Path, fingerprint: str, tokens: Mapping[str, str], *,
                 api_keys: Iterable[str] = (), api_keys_file: Path | None = None) -> None:
        self._db = db
        self.state_dir = Path(state_dir)
        self.fingerprint = fingerprint
        self._tokens = dict(tokens)
        self._flag_keys = tuple(check_api_key(k, "--api-key") for k in api_keys)
        self._keys_file = Path(api_keys_file) if api_keys_file is not None else None
        self._file_keys: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._token_stamp = self._stamp(self._token_paths())
        self._keys_stamp: tuple = ()
        if self._keys_file is not None:
            self._keys_stamp = self._stamp([self._keys_file])
            self._file_keys = read_api_keys_file(self._keys_file)  # ConfigError at start: say so at once

    def _token_paths(self) -> list[Path]:
        return [self.state_dir / TOKEN_FILES[k] for k in KINDS]

    @staticmethod
    def _stamp(paths: list[Path]) -> tuple:
        out = []
        for p in paths:
            try:
                st = p.stat()
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def refresh(self) -> None:
        """Reload the tokens from SQLite when a token file changed, and the API keys file when it
        changed. A failure keeps the current values (logged): a bad edit never opens the door."""
        stamp = self._stamp(self._token_paths())
        if stamp != self._token_stamp:
            try:
                stored = _stored_secrets(self._db)
            except Exception:  # noqa: BLE001 -- keep serving with the tokens we have
                log.exception("reloading the tokens from SQLite failed; keeping the current ones")
            else:
                with self._lock:
                    for kind, secret in stored.items():
                        token = certs.format_token(self.fingerprint, secret)
                        if token != self._tokens.get(kind):
                            log.warning("the %s token was rotated; the old one is refused from now on", kind)
                        self._tokens[kind] = token
                    self._token_stamp = stamp
        if self._keys_file is not None:
            stamp = self._stamp([self._keys_file])
            if stamp != self._keys_stamp:
                try:
                    keys = read_api_keys_file(self._keys_file)
                except ConfigError as exc:
                    log.error("%s; keeping the previous API keys", exc)
                    keys = None
                with self._lock:
                    if keys is not None:
                        self._file_keys = keys
                        log.info("reloaded %d API key(s) from %s", len(keys), self._keys_file)
                    self._keys_stamp = stamp

    def token(self, kind: str) -> str:
        self.refresh()
        with self._lock:
            return self._tokens[kind]

    def kind_of(self, given: str) -> str | None:
        """``join``, ``admin`` or ``read`` when ``given`` is that current token, else None."""
        if not given or len(given) > MAX_API_TOKEN_CHARS:
            return None
        self.refresh()
        with self._lock:
            tokens = dict(self._tokens)
        found = None
        for kind in KINDS:  # compare with every token (no early exit): timing says nothing
            if hmac.compare_digest(given.encode(), tokens[kind].encode()):
                found = kind
        return found

    @property
    def has_api_keys(self) -> bool:
        self.refresh()
        with self._lock:
            return bool(self._flag_keys or self._file_keys)

    def is_api_key(self, given: str) -> bool:
        if not given or len(given) > MAX_API_KEY_CHARS:
            return False
        self.refresh()
        with self._lock:
            keys = self._flag_keys + self._file_keys
        match = False
        for key in keys:
            match |= hmac.compare_digest(given.encode(), key.encode())
        return match


def check_api_key(key: str, where: str) -> str:
    key = key.strip()
    if not (8 <= len(key) <= MAX_API_KEY_CHARS and key.isprintable() and " " not in key):
        raise ConfigError(f"{where}: an API key must be 8..{MAX_API_KEY_CHARS} printable characters without spaces")
    return key


def read_api_keys_file(path: Path) -> tuple[str, ...]:
    """API keys, one per line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read --api-keys-file {path} ({exc})") from exc
    return tuple(check_api_key(line, f"--api-keys-file {path} line {i}")
                 for i, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#"))


# ----------------------------------------------------------------------------- decisions (pure)
def _how(channel: str, kind: str) -> str:
    """How to pass a token of ``kind`` on ``channel`` ("grpc" or "http")."""
    field = READY_FIELDS[kind]
    if channel == "http":
        return (f'send the header "Authorization: Bearer {kind.upper()}_TOKEN" with the {kind} token '
                f"({field}= in the READY line of swarm-coordinator serve, also in its state dir file {TOKEN_FILES[kind]})")
    return (f"pass --token {kind.upper()}_TOKEN or set SWARM_TOKEN to the {kind} token ({field}= in the READY line "
            f"of swarm-coordinator serve, also in its state dir file {TOKEN_FILES[kind]})")


def read_access(kind: str | None, presented: bool, *, public_status: bool, channel: str = "grpc") -> Access:
    """What a reader may see. ``kind``: the token presented (None: none or not a current token);
    ``presented``: whether anything was presented. Raises AuthError / PermissionDeniedError."""
    if kind in (READ, ADMIN):
        return Access.FULL
    if kind == JOIN:
        if public_status:
            return Access.PUBLIC
        raise PermissionDeniedError(
            "the join token lets nodes join, not read the swarm's state: use the read token or the admin token; "
            + _how(channel, READ))
    if presented:
        raise AuthError("the token given is not this coordinator's read or admin token (wrong, or rotated since): "
                        + _how(channel, READ))
    if public_status:
        return Access.PUBLIC
    extra = (", or open the status page URL swarm-coordinator serve printed (status page: http://HOST:PORT/?token=...)"
             if channel == "http" else "")
    raise AuthError(f"reading the swarm's state needs the coordinator's read token: {_how(channel, READ)}{extra}; "
                    "the admin token works too (an operator can also run the coordinator with --public-status)")


def admin_access(kind: str | None, presented: bool, action: str) -> None:
    """Allow ``action`` (a change to what the swarm runs) for the admin token only."""
    if kind == ADMIN:
        return
    if kind in (JOIN, READ):
        raise PermissionDeniedError(
            f"{action} needs the coordinator's token for changes, and the {kind} token cannot do that: use the admin "
            f"token printed as admin_token= by swarm-coordinator serve (also in its state dir file admin_token)")
    if presented:
        raise AuthError(f"{action} needs the coordinator's token, and the token given is wrong: use the token printed by "
                        "swarm-coordinator serve as admin_token= (also in its state dir file admin_token); a token "
                        "replaced by swarm-coordinator rotate-token is refused")
    raise AuthError(f"{action} needs the coordinator's token, and no token was given: pass --token or set SWARM_TOKEN "
                    "to the admin token (admin_token= in the line swarm-coordinator serve printed, also in its state "
                    "dir file admin_token)")


def api_access(given: str, credentials: Credentials) -> None:
    """``/v1``: an API key when any are configured, else the read or admin token. Raises AuthError."""
    if credentials.has_api_keys:
        if credentials.is_api_key(given):
            return
        raise AuthError('this API needs an API key: send "Authorization: Bearer KEY" with a key the coordinator\'s '
                        "operator configured (--api-key / --api-keys-file)"
                        + ("" if given else "; no key was given"))
    kind = credentials.kind_of(given)
    if kind in (READ, ADMIN):
        return
    if kind == JOIN:
        raise PermissionDeniedError("the join token lets nodes join, not use this API: " + _how("http", READ))
    raise AuthError(("the token given is not this coordinator's read or admin token: " if given
                     else "this API needs the coordinator's read token: ") + _how("http", READ))
