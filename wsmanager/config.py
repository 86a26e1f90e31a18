"""Every ``WSMANAGER_*`` variable, in one table: :data:`OPTIONS`.

Each :class:`Option` row says the variable, the keyword argument it corresponds to, its type and
accepted range, its one default, what it means and which parts read it (:data:`PARTS`). Nothing
else in wsmanager parses a variable or checks an option's range:

* :func:`from_env` reads and validates *every* variable of the table that is set (an empty value
  counts as unset) and returns ``{option name: value}``; a bad value raises :class:`ConfigError`
  naming the variable and what it accepts. It also warns (:class:`ConfigWarning`, once per
  variable and process) about ``WSMANAGER_*`` variables that are not in the table.
* :func:`values` is :func:`from_env` plus the defaults, for the options one part reads.
* :func:`check` / :func:`check_kwargs` validate keyword arguments by the same rules, naming the
  argument.

Who reads what, and when:

* ``WebSocketManager.from_env()`` -- the module-level ``ws_manager``, built when ``wsmanager``
  is imported -- calls :func:`from_env`, so importing wsmanager validates every variable, the
  engine's, the handshake's and Redis' included: ``python -m wsmanager app:app``, ``uvicorn
  app:app`` (either plane: ``--ws wsmanager.uvicorn:...`` imports wsmanager too) and gunicorn's
  arbiter stop at start-up with the variable named. ``WebSocketManager(...)`` and
  ``configure()`` validate their keyword arguments with :func:`check`.
* ``wsmanager.uvicorn`` / ``wsmanager._http`` read the ``protocol`` options at import and the
  ``engine`` options when the engine starts (``configure_engine()`` arguments win over the
  variables, which win over uvicorn's ``--ws-ping-interval`` / ``--ws-ping-timeout`` /
  ``--ws-max-size`` when those differ from uvicorn's own defaults, which the table's defaults
  replace).
* ``RedisBackend`` reads the ``redis`` options for every keyword argument left out.

One default per variable: ``WSMANAGER_PING_INTERVAL``, ``_PING_TIMEOUT``, ``_SEND_TIMEOUT`` and
``_CLOSE_TIMEOUT`` used to mean 30/10/5/2 s to the manager and 20/20/10/5 s to the native
engine; both now use the manager's values (the seed's API: ``ping_interval=30``,
``ping_timeout=10``; the engine's stale rule is the manager's, ``ping_interval + ping_timeout``
of silence).

``python -m wsmanager.config`` prints the README's Configuration table (:func:`markdown_table`).
"""
from __future__ import annotations

import difflib
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlsplit

__all__ = ["Option", "OPTIONS", "PARTS", "OTHER_VARIABLES", "ConfigError", "ConfigWarning",
           "from_env", "values", "defaults", "derived_default", "check", "check_kwargs",
           "check_together",
           "option", "names", "default_text", "accepted", "markdown_table", "redact_url"]


class ConfigError(ValueError):
    """A bad option value, from a ``WSMANAGER_*`` variable (``variable`` is its name) or a
    keyword argument (``argument``); the message says what is accepted."""

    def __init__(self, message: str, *, variable: str | None = None, argument: str | None = None,
                 option: str | None = None, errors: list[ConfigError] | None = None) -> None:
        super().__init__(message)
        self.variable = variable
        self.argument = argument
        self.option = option
        self.errors = errors or [self]


class ConfigTypeError(ConfigError, TypeError):
    """A keyword argument of the wrong type (a ``TypeError`` too, as Python's own)."""


class ConfigWarning(UserWarning):
    """A ``WSMANAGER_*`` variable that no part of wsmanager reads (a typo?)."""


#: The parts that read options, for :attr:`Option.used_by`.
PARTS: dict[str, str] = {
    "manager": "`WebSocketManager` (both planes)",
    "engine": "the native plane's C engine (`wsmanager.uvicorn`, at its start)",
    "protocol": "the native plane's uvicorn protocols, handshake and before the 101 "
                "(`wsmanager.uvicorn`, `wsmanager._http`, at import)",
    "redis": "`RedisBackend` (`wsmanager.backends.redis`)",
    "router": "the debug routes of `wsmanager.fastapi.router`",
}

#: ``WSMANAGER_*`` variables that are not options of the running package (no warning for them).
OTHER_VARIABLES: dict[str, str] = {
    "WSMANAGER_SANITIZE": "build: `setup.py` compiles the extension with `-fsanitize=<value>` (`make test-asan`)",
    "WSMANAGER_CHROMIUM": "tests: the Chromium binary of `tests/test_browser.py`",
}

_REJECT = object()  # Option.none: a keyword None is not accepted

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
YEAR = 365 * 86400
COUNT_MAX = (1 << 32) - 1  # the registry's counters are 32-bit


@dataclass(frozen=True)
class Option:
    """One row of the table."""

    name: str                 #: keyword argument (``WebSocketManager``, ``configure_engine``, ``RedisBackend``)
    env: str                  #: environment variable
    type: str                 #: "float", "int", "bool", "str", "url" or "origins"
    default: Any              #: the one default (None: unset, or derived, see ``derive``)
    min: float | None = None  #: smallest accepted value (numbers)
    max: float | None = None  #: largest accepted value (numbers)
    meaning: str = ""         #: what it does (Markdown, one line: the README's table uses it)
    used_by: tuple[str, ...] = ()  #: keys of :data:`PARTS`
    unit: str = ""            #: "s", "bytes", "µs" or ""
    min_exclusive: bool = False  #: the value must be > min, not >= min
    zero: str = ""            #: what 0 means, when 0 is special
    none: Any = _REJECT       #: what a keyword ``None`` stands for (``_REJECT``: not accepted)
    derive: Callable[[Mapping[str, Any]], Any] | None = None  #: the default from other options
    default_words: str = ""   #: the default in words (derived or unset ones)
    secret: bool = False      #: never shown in messages


def _stale_after(v: Mapping[str, Any]) -> float:
    # No heartbeat, no stale detection: silence is only stale when pings ask for answers.
    return v["ping_interval"] + v["ping_timeout"] if v["ping_interval"] else 0.0


OPTIONS: tuple[Option, ...] = (
    # ---- the manager (and, where the engine says so, the native engine: one value for both)
    Option("ping_interval", "WSMANAGER_PING_INTERVAL", "float", 30.0, 0, YEAR, unit="s", zero="off",
           used_by=("manager", "engine"),
           meaning="heartbeat period: the manager's JSON `{\"type\": \"ping\"}` and stale sweep, "
                   "the engine's RFC 6455 pings"),
    Option("ping_timeout", "WSMANAGER_PING_TIMEOUT", "float", 10.0, 0, YEAR, unit="s",
           used_by=("manager", "engine"),
           meaning="silence tolerated after a heartbeat: silent for `ping_interval + ping_timeout`, "
                   "a connection is closed as stale (1011)"),
    Option("stale_timeout", "WSMANAGER_STALE_TIMEOUT", "float", None, 0, YEAR, unit="s",
           min_exclusive=True, none=None, derive=_stale_after, used_by=("manager",),
           default_words="`ping_interval + ping_timeout` (none when `ping_interval` is 0)",
           meaning="silence after which the manager's sweep closes a connection as stale"),
    Option("max_connections_per_user", "WSMANAGER_MAX_CONNECTIONS_PER_USER", "int", 5, 0, COUNT_MAX,
           zero="no limit", none=0, used_by=("manager",),
           meaning="connections one user may hold (cluster-wide with Redis); over it `connect` "
                   "closes with 1008"),
    Option("max_connections", "WSMANAGER_MAX_CONNECTIONS", "int", 0, 0, COUNT_MAX, zero="no limit",
           none=0, used_by=("manager",), meaning="connections this process may hold"),
    Option("send_timeout", "WSMANAGER_SEND_TIMEOUT", "float", 5.0, 0, YEAR, unit="s",
           min_exclusive=True, used_by=("manager", "engine"),
           meaning="how long a send may block before its receiver is closed as a slow consumer (1008)"),
    Option("close_timeout", "WSMANAGER_CLOSE_TIMEOUT", "float", 2.0, 0, YEAR, unit="s",
           min_exclusive=True, used_by=("manager", "engine"),
           meaning="how long a close may take (the manager: writing it; the engine: the peer's "
                   "answering Close)"),
    Option("greeting", "WSMANAGER_GREETING", "bool", False, used_by=("manager",),
           meaning="send `{\"type\": \"connection_established\", ...}` after accept (seed 004)"),
    Option("json_heartbeat", "WSMANAGER_JSON_HEARTBEAT", "bool", True, used_by=("manager",),
           meaning="send the JSON pings at all (the seed's clients expect them)"),
    Option("hook_queue_limit", "WSMANAGER_HOOK_QUEUE_LIMIT", "int", 100_000, 0, COUNT_MAX,
           zero="no limit", used_by=("manager",),
           meaning="lifecycle-hook events waiting for slow hooks (per event loop); past it new "
                   "events are dropped: counted in `get_stats()[\"hooks\"]`, one WARNING per burst"),
    Option("redis_url", "WSMANAGER_REDIS_URL", "url", None, none=None, used_by=("manager", "redis"),
           default_words="none (one process)",
           meaning="scale out through this Redis (see Scaling out)"),
    # ---- the native engine
    Option("max_message_size", "WSMANAGER_MAX_MESSAGE_SIZE", "int", 16 * MiB, 1, TiB, unit="bytes",
           used_by=("engine",), meaning="largest inbound message; above it the engine closes with 1009"),
    Option("high_water", "WSMANAGER_HIGH_WATER", "int", 1 * MiB, 1, TiB, unit="bytes",
           used_by=("engine",), meaning="bytes queued for a connection above which `send` awaits"),
    Option("max_queue_bytes", "WSMANAGER_MAX_QUEUE_BYTES", "int", 16 * MiB, 1, TiB, unit="bytes",
           used_by=("engine",),
           meaning="bytes queued for a connection above which it is closed as a slow consumer (1008)"),
    Option("read_limit", "WSMANAGER_READ_LIMIT", "int", 1 * MiB, 1, TiB, unit="bytes",
           used_by=("engine",),
           meaning="inbound bytes charged to a connection, not yet taken by the app, before its "
                   "reading pauses"),
    Option("event_queue_limit", "WSMANAGER_EVENT_QUEUE_LIMIT", "int", 64 * MiB, 1, TiB, unit="bytes",
           used_by=("engine",),
           meaning="charged bytes of undrained events, whole process, before all reading stops"),
    Option("compress_threshold", "WSMANAGER_COMPRESS_THRESHOLD", "int", 256, 0, TiB, unit="bytes",
           zero="compress every message", used_by=("engine",),
           meaning="messages shorter than this go uncompressed to clients that negotiated "
                   "permessage-deflate (see Compression)"),
    # ---- the native plane's protocols (handshake, before the 101, event-loop thread)
    Option("allowed_origins", "WSMANAGER_ALLOWED_ORIGINS", "origins", frozenset(), used_by=("protocol",),
           default_words="any Origin",
           meaning="comma-separated origins (`scheme://host[:port]`); an upgrade must send exactly "
                   "one `Origin` header naming one, else 403"),
    Option("per_message_deflate", "WSMANAGER_PER_MESSAGE_DEFLATE", "bool", True, used_by=("protocol",),
           default_words="on (unset: uvicorn's `--ws-per-message-deflate`, on by default)",
           meaning="negotiate permessage-deflate (RFC 7692) on the native plane (see Compression)"),
    Option("max_header_bytes", "WSMANAGER_MAX_HEADER_BYTES", "int", 16 * KiB, 1 * KiB, 1 * MiB,
           unit="bytes", used_by=("protocol",),
           meaning="largest request head of an upgrade; above it the answer is 431"),
    Option("loop_slice_us", "WSMANAGER_LOOP_SLICE_US", "int", 100, 0, 100_000, unit="µs",
           zero="the kernel's default", used_by=("protocol",),
           meaning="scheduler slice asked for the event-loop thread at the first native connection "
                   "(EEVDF, Linux 6.12 and later)"),
    Option("gc_freeze", "WSMANAGER_GC_FREEZE", "bool", True, used_by=("protocol",),
           meaning="at the first native connection, collect once and `gc.freeze()` what the app made "
                   "at import and start-up, so that full collections walk only what came after (see "
                   "\"What a host needs for 100 000 connections\")"),
    Option("handshake_timeout", "WSMANAGER_HANDSHAKE_TIMEOUT", "float", 5.0, 0, YEAR, unit="s",
           zero="off", used_by=("protocol",),
           meaning="time a connection has to send a complete request head (`--http "
                   "wsmanager.uvicorn:HTTPProtocol`)"),
    Option("max_handshakes", "WSMANAGER_MAX_HANDSHAKES", "int", 1024, 0, COUNT_MAX, zero="no cap",
           used_by=("protocol",),
           meaning="connections waiting for their request head, per process; above it the oldest "
                   "is closed"),
    # ---- the Redis backend
    Option("prefix", "WSMANAGER_REDIS_PREFIX", "str", "wsmanager", used_by=("redis",),
           meaning="key and channel namespace: one per cluster sharing a Redis"),
    Option("node_ttl", "WSMANAGER_REDIS_NODE_TTL", "float", 15.0, 0.2, YEAR, unit="s", used_by=("redis",),
           meaning="silence after which a process counts as dead and its entries are collected"),
    Option("heartbeat_interval", "WSMANAGER_REDIS_HEARTBEAT", "float", None, 0.05, YEAR, unit="s",
           derive=lambda v: v["node_ttl"] / 3, used_by=("redis",), default_words="`node_ttl / 3`",
           meaning="heartbeat and cluster-stats refresh period; shorter than `node_ttl`"),
    Option("op_timeout", "WSMANAGER_REDIS_TIMEOUT", "float", 2.0, 0.01, YEAR, unit="s",
           used_by=("redis",), meaning="connect and per-command timeout"),
    Option("backoff_base", "WSMANAGER_REDIS_BACKOFF_BASE", "float", 0.1, 0.001, YEAR, unit="s",
           used_by=("redis",),
           meaning="reconnect delay: uniform in [0, min(`backoff_max`, `backoff_base`·2ⁿ)]"),
    Option("backoff_max", "WSMANAGER_REDIS_BACKOFF_MAX", "float", 10.0, 0.001, YEAR, unit="s",
           used_by=("redis",), meaning="longest reconnect delay"),
    Option("max_pending", "WSMANAGER_REDIS_MAX_PENDING", "int", 10_000, 1, COUNT_MAX, used_by=("redis",),
           meaning="publishes queued for Redis; when full `publish` waits up to `op_timeout`, then drops"),
    # ---- the router
    Option("admin_token", "WSMANAGER_ADMIN_TOKEN", "str", None, none=None, secret=True,
           used_by=("router",), default_words="none (debug routes answer 403)",
           meaning="shared secret of the debug routes, read on every request"),
)

_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
_BY_ENV: dict[str, Option] = {o.env: o for o in OPTIONS}
assert len(_BY_NAME) == len(_BY_ENV) == len(OPTIONS), "option names and variables must be unique"

#: Pairs (shorter, longer) that must hold after every default is applied.
_SHORTER_THAN = (("heartbeat_interval", "node_ttl"),)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_URL_SCHEMES = ("redis", "rediss", "unix")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s,]+")


def option(name: str) -> Option:
    """The row of option ``name`` (KeyError for an unknown one)."""
    return _BY_NAME[name]


def names(part: str) -> tuple[str, ...]:
    """The options ``part`` (a key of :data:`PARTS`) reads."""
    if part not in PARTS:
        raise KeyError(f"unknown part {part!r}; parts: {', '.join(PARTS)}")
    return tuple(o.name for o in OPTIONS if part in o.used_by)


def defaults(part: str | None = None) -> dict[str, Any]:
    """``{name: default}`` of every option (of ``part``); derived defaults are None here."""
    return {o.name: o.default for o in OPTIONS if part is None or part in o.used_by}


# --------------------------------------------------------------------------------------------
# describing an option


def _plain(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{n:g}"


def _human(opt: Option, n: float) -> str:
    """``n`` in ``opt``'s unit, binary multiples for bytes (16 MiB)."""
    if opt.unit == "bytes":
        for size, unit in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
            if n >= size and n % size == 0:
                return f"{int(n // size)} {unit}"
        return f"{int(n)} B"
    return f"{_plain(n)} {opt.unit}" if opt.unit else _plain(n)


def _bound(opt: Option, n: float) -> str:
    if opt.unit == "bytes" and n >= KiB:
        return f"{_plain(n)} ({_human(opt, n)})"
    return _plain(n)


def accepted(opt: Option, *, keyword: bool = False) -> str:
    """What ``opt`` accepts, in words (part of every :class:`ConfigError`)."""
    if opt.type == "bool":
        return "True or False" if keyword else "1/0, true/false, yes/no, on/off"
    if opt.type == "str":
        return "a string"
    if opt.type == "url":
        return "a redis://, rediss:// or unix:// URL"
    if opt.type == "origins":
        return ("origins scheme://host[:port], comma-separated" if not keyword else
                "origins scheme://host[:port]: a comma-separated str or an iterable of str")
    noun = "a number" if opt.type == "float" else "an integer"
    noun += {"bytes": " of bytes", "s": " of seconds", "": ""}.get(opt.unit, f" of {opt.unit}")
    if opt.min is None or opt.max is None:
        raise AssertionError(f"{opt.name}: numbers have both bounds")
    if opt.min_exclusive:
        text = f"{noun} > {_bound(opt, opt.min)} and <= {_bound(opt, opt.max)}"
    else:
        text = f"{noun} from {_bound(opt, opt.min)} to {_bound(opt, opt.max)}"
    keyword_none = keyword and opt.none is not _REJECT
    if opt.zero:
        text += f"; 0{' or None' if keyword_none and opt.none == 0 else ''} = {opt.zero}"
    if keyword_none and opt.none is None:
        text += f"; None = {opt.default_words or 'unset'}"
    return text


def default_text(opt: Option) -> str:
    """The default as the README's table shows it."""
    if opt.default_words:
        return opt.default_words
    if opt.type == "bool":
        return "on" if opt.default else "off"
    if opt.default is None:
        return "none"
    if opt.type == "str":
        return f"`{opt.default}`"
    return _human(opt, opt.default)


def markdown_table() -> str:
    """The README's Configuration table, from :data:`OPTIONS`."""
    rows = ["| variable | keyword | accepts | default | used by | meaning |",
            "| --- | --- | --- | --- | --- | --- |"]
    for o in OPTIONS:
        rows.append(f"| `{o.env}` | `{o.name}` | {accepted(o)} | {default_text(o)} | "
                    f"{', '.join(o.used_by)} | {o.meaning} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# validation


class _Bad(Exception):
    """Internal: a value that fails ``opt``'s rules (``kind``: "type" or "value")."""

    def __init__(self, problem: str, kind: str = "value") -> None:
        super().__init__(problem)
        self.kind = kind


def redact_url(url: str) -> str:
    """The URL without its password, for messages, logs and stats."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    else:
        netloc = f":***@{netloc}"
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


def _shown(opt: Option, value: Any) -> str:
    if opt.secret:
        return "<hidden>"
    if opt.type == "url" and isinstance(value, str):
        return repr(redact_url(value))
    return repr(value)


def _in_range(opt: Option, value: float) -> None:
    if opt.min is not None:
        if value < opt.min or (opt.min_exclusive and value == opt.min):
            raise _Bad(f"must be {'>' if opt.min_exclusive else '>='} {_bound(opt, opt.min)}")
    if opt.max is not None and value > opt.max:
        raise _Bad(f"must be <= {_bound(opt, opt.max)}")


def _origins(items: Iterable[Any]) -> frozenset[str]:
    out = []
    for item in items:
        if not isinstance(item, str):
            raise _Bad(f"an origin must be a str, not {type(item).__name__}", "type")
        entry = item.strip().lower()
        if not entry:
            continue
        if entry != "null" and not _ORIGIN.fullmatch(entry):
            raise _Bad(f"{item.strip()!r} is not an origin (scheme://host[:port], no path, as "
                       f"browsers send it)")
        out.append(entry)
    return frozenset(out)


def _from_text(opt: Option, raw: str) -> Any:
    text = raw.strip()
    kind = opt.type
    if kind == "float":
        try:
            value: Any = float(text)
        except ValueError:
            raise _Bad("not a number") from None
        if not math.isfinite(value):
            raise _Bad("not a finite number")
        _in_range(opt, value)
    elif kind == "int":
        try:
            value = int(text, 10)
        except ValueError:
            raise _Bad("not an integer") from None
        _in_range(opt, value)
    elif kind == "bool":
        low = text.lower()
        if low not in _TRUE and low not in _FALSE:
            raise _Bad("not a boolean")
        value = low in _TRUE
    elif kind == "url":
        value = _url(text)
    elif kind == "origins":
        value = _origins(text.split(","))
    else:
        value = text
    return value


def _url(value: str) -> str:
    try:
        scheme = urlsplit(value).scheme
    except ValueError:
        scheme = ""
    if scheme not in _URL_SCHEMES:
        raise _Bad("not a Redis URL")
    return value


def _from_keyword(opt: Option, value: Any) -> Any:
    kind = opt.type
    if kind in ("float", "int"):
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind == "float" else int):
            raise _Bad(f"not {'a number' if kind == 'float' else 'an int'} "
                       f"({type(value).__name__})", "type")
        if kind == "float":
            if not math.isfinite(value):
                raise _Bad("not a finite number")
            value = float(value)
        else:
            value = int(value)
        _in_range(opt, value)
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _Bad(f"not a bool ({type(value).__name__})", "type")
    if kind == "origins":
        if isinstance(value, str):
            return _origins(value.split(","))
        try:
            items = list(value)
        except TypeError:
            raise _Bad(f"not a str or an iterable of str ({type(value).__name__})", "type") from None
        return _origins(items)
    if not isinstance(value, str):
        raise _Bad(f"not a str ({type(value).__name__})", "type")
    return _url(value) if kind == "url" else value


def check(name: str, value: Any, *, what: str | None = None) -> Any:
    """``value`` of keyword argument ``name`` (an option of the table), validated and normalized
    (ints to float for seconds, ...). ``what`` names the argument in errors (default ``name``;
    e.g. ``"--ws-ping-interval"``). Raises :class:`ConfigError` (:class:`ConfigTypeError`, a
    ``TypeError`` too, for a wrong type)."""
    opt = _BY_NAME[name]
    label = what or name
    if value is None:
        if opt.none is _REJECT:
            raise ConfigTypeError(f"{label}=None: not accepted; accepted: {accepted(opt, keyword=True)}",
                                  argument=label, option=name)
        return opt.none
    try:
        return _from_keyword(opt, value)
    except _Bad as bad:
        cls = ConfigTypeError if bad.kind == "type" else ConfigError
        raise cls(f"{label}={_shown(opt, value)}: {bad}; accepted: {accepted(opt, keyword=True)}",
                  argument=label, option=name) from None


def check_kwargs(options: Mapping[str, Any], part: str | Iterable[str], *, func: str) -> dict[str, Any]:
    """Keyword arguments of ``func`` validated with :func:`check`; names that are not options of
    ``part`` (a key of :data:`PARTS`, or the accepted names) raise ``TypeError`` as Python does."""
    allowed = names(part) if isinstance(part, str) else tuple(part)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{func}() got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"it takes {', '.join(allowed)}")
    return {k: check(k, v) for k, v in options.items()}


def check_together(resolved: Mapping[str, Any], given: Mapping[str, str] | None = None) -> None:
    """The rules between options, on final values (defaults applied): ``heartbeat_interval`` <
    ``node_ttl``. ``given`` names where each value came from (``{name: "WSMANAGER_X='3'"}``);
    the others are named by argument and variable."""
    for short, long in _SHORTER_THAN:
        a, b = resolved.get(short), resolved.get(long)
        if a is None or b is None or a < b:
            continue
        given = given or {}
        oa, ob = _BY_NAME[short], _BY_NAME[long]
        da = given.get(short, f"{short} ({oa.env}) = {_plain(a)}")
        db = given.get(long, f"{long} ({ob.env}) = {_plain(b)}")
        raise ConfigError(f"{da}: must be shorter than {db}", variable=oa.env if short in given else None,
                          option=short)


_warned: set[str] = set()


def _warn_unknown(env: Mapping[str, str]) -> None:
    for key in env:
        if not key.startswith("WSMANAGER_") or key in _BY_ENV or key in OTHER_VARIABLES or key in _warned:
            continue
        _warned.add(key)
        close = difflib.get_close_matches(key, list(_BY_ENV), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warnings.warn(f"{key} is not a wsmanager variable and is ignored{hint}; the variables are "
                      f"listed in wsmanager.config.OPTIONS and the README's Configuration table",
                      ConfigWarning, stacklevel=3)


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every variable of the table that is set in ``environ`` (default ``os.environ``; an empty
    value counts as unset), parsed and validated: ``{option name: value}``. Raises
    :class:`ConfigError` naming each bad variable and what it accepts; warns once per process
    about ``WSMANAGER_*`` names the table does not have."""
    env = os.environ if environ is None else environ
    got: dict[str, Any] = {}
    raw_of: dict[str, str] = {}
    errors: list[ConfigError] = []
    for opt in OPTIONS:
        raw = env.get(opt.env)
        if raw is None or not raw.strip():
            continue
        try:
            got[opt.name] = _from_text(opt, raw)
            raw_of[opt.name] = f"{opt.env}={_shown(opt, raw)}"
        except _Bad as bad:
            errors.append(ConfigError(f"{opt.env}={_shown(opt, raw)}: {bad}; accepted: {accepted(opt)}",
                                      variable=opt.env, option=opt.name))
    _warn_unknown(env)
    if not errors:
        try:  # the defaults agree with each other: a failure involves a variable that is set
            check_together(_resolve(got), raw_of)
        except ConfigError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        lines = "".join(f"\n  {e}" for e in errors)
        raise ConfigError(f"{len(errors)} bad WSMANAGER_* variables:{lines}", variable=errors[0].variable,
                          option=errors[0].option, errors=errors)
    return got


def _resolve(given: Mapping[str, Any]) -> dict[str, Any]:
    out = {o.name: given.get(o.name, o.default) for o in OPTIONS}
    for o in OPTIONS:
        if o.derive is not None and out[o.name] is None:
            out[o.name] = o.derive(out)
    return out


def derived_default(name: str, others: Mapping[str, Any]) -> Any:
    """The default of a derived option (``stale_timeout``, ``heartbeat_interval``) from the
    values of the options it depends on."""
    opt = _BY_NAME[name]
    if opt.derive is None:
        return opt.default
    return opt.derive({**_resolve({}), **others})


def values(part: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every option ``part`` reads: its variable's value when set, else the default (derived
    ones computed). Validates every variable, as :func:`from_env`."""
    resolved = _resolve(from_env(environ))
    return {name: resolved[name] for name in names(part)}


if __name__ == "__main__":
    print(markdown_table())
