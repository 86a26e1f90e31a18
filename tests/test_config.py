"""The one configuration table (wsmanager/config.py): every ``WSMANAGER_*`` variable validated
at start-up, naming it; keyword arguments by the same rules; one default per variable, read by
the manager, the native plane and the Redis backend; the README's table is the table."""
from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

import pytest
from uvicorn.config import Config

from tests.servers import AppServer, ServerFailed
from wsmanager import WebSocketManager, config
from wsmanager.config import OPTIONS, ConfigError, ConfigWarning

ROOT = Path(__file__).resolve().parent.parent

# A value of the wrong type and values out of range, as a variable would carry them.
_NOT_A = {"float": "soon", "int": "12.5", "bool": "maybe", "url": "http://127.0.0.1:6379/0",
          "origins": "https://app.example.com/"}


def _out_of_range(opt: config.Option) -> list[str]:
    if opt.type not in ("int", "float"):
        return []
    below = opt.min if opt.min_exclusive else opt.min - (1 if opt.type == "int" else opt.min / 2 or 1)
    return [str(int(below) if opt.type == "int" else below), str(int(opt.max * 2))]


# ---- the table ------------------------------------------------------------------------------

def test_the_table_is_consistent():
    assert len({o.name for o in OPTIONS}) == len({o.env for o in OPTIONS}) == len(OPTIONS)
    for o in OPTIONS:
        assert o.env.startswith("WSMANAGER_"), o
        assert o.type in ("float", "int", "bool", "str", "url", "origins"), o
        assert o.used_by and set(o.used_by) <= set(config.PARTS), o
        assert o.meaning and "|" not in o.meaning and "\n" not in o.meaning, o
        if o.type in ("int", "float"):
            assert o.min is not None and o.max is not None and o.min < o.max, o
        if o.default is None:
            assert o.default_words, o  # a derived or unset default says so in words
        else:  # every default passes its own rules
            assert config.check(o.name, o.default) == o.default, o
    assert not set(config.OTHER_VARIABLES) & {o.env for o in OPTIONS}


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.env)
def test_every_bad_variable_names_itself_and_what_it_accepts(opt: config.Option):
    bad = [v for v in (_NOT_A.get(opt.type), *_out_of_range(opt)) if v is not None]
    if opt.type == "str":
        assert config.from_env({opt.env: "anything"}) == {opt.name: "anything"}
        return
    assert bad
    for raw in bad:
        with pytest.raises(ConfigError) as info:
            config.from_env({opt.env: raw})
        message = str(info.value)
        assert message.startswith(f"{opt.env}={raw!r}: "), message
        assert f"; accepted: {config.accepted(opt)}" in message, message
        assert info.value.variable == opt.env and info.value.option == opt.name


@pytest.mark.parametrize("opt", [o for o in OPTIONS if o.type in ("int", "float")], ids=lambda o: o.name)
def test_keyword_arguments_follow_the_same_rules_naming_the_argument(opt: config.Option):
    with pytest.raises(TypeError, match=rf"^{opt.name}='1': not an? "):
        config.check(opt.name, "1")
    with pytest.raises(ConfigError, match=rf"^{opt.name}={opt.max * 2!r}: must be <= "):
        config.check(opt.name, opt.max * 2)
    assert config.check(opt.name, opt.max) == opt.max
    if opt.name != "heartbeat_interval":  # must also be shorter than node_ttl
        assert config.from_env({opt.env: str(opt.max)}) == {opt.name: opt.max}


def test_values_are_parsed_as_documented():
    got = config.from_env({
        "WSMANAGER_GREETING": "Yes", "WSMANAGER_JSON_HEARTBEAT": "off", "WSMANAGER_PING_INTERVAL": " 2.5 ",
        "WSMANAGER_MAX_MESSAGE_SIZE": "1_048_576", "WSMANAGER_MAX_CONNECTIONS": "",  # empty: unset
        "WSMANAGER_ALLOWED_ORIGINS": "https://App.example.com, http://localhost:3000,,null",
        "WSMANAGER_REDIS_URL": "rediss://:pw@redis.example:6380/1",
    })
    assert got == {"greeting": True, "json_heartbeat": False, "ping_interval": 2.5,
                   "max_message_size": 1 << 20, "redis_url": "rediss://:pw@redis.example:6380/1",
                   "allowed_origins": frozenset({"https://app.example.com", "http://localhost:3000", "null"})}


def test_every_bad_variable_is_reported_at_once_and_secrets_are_not_shown():
    with pytest.raises(ConfigError) as info:
        config.from_env({"WSMANAGER_MAX_MESSAGE_SIZE": "abc", "WSMANAGER_PING_TIMEOUT": "-1",
                         "WSMANAGER_REDIS_URL": "http://:hunter2@10.0.0.1:6379"})
    message = str(info.value)
    assert message.startswith("3 bad WSMANAGER_* variables:")
    for var in ("WSMANAGER_MAX_MESSAGE_SIZE='abc'", "WSMANAGER_PING_TIMEOUT='-1'", "WSMANAGER_REDIS_URL="):
        assert var in message
    assert "hunter2" not in message and len(info.value.errors) == 3


def test_rules_between_options():
    with pytest.raises(ConfigError, match=r"^WSMANAGER_REDIS_HEARTBEAT='20': must be shorter than "
                                          r"node_ttl \(WSMANAGER_REDIS_NODE_TTL\) = 15"):
        config.from_env({"WSMANAGER_REDIS_HEARTBEAT": "20"})
    assert config.values("redis", {"WSMANAGER_REDIS_NODE_TTL": "30"})["heartbeat_interval"] == 10


def test_unknown_variables_warn_once_with_the_closest_name(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(config, "_warned", set())
    env = {"WSMANAGER_PING_INTERVL": "3", "WSMANAGER_SANITIZE": "address", "WSMANAGER_CHROMIUM": "/x"}
    with pytest.warns(ConfigWarning) as caught:
        assert config.from_env(env) == {}
    assert len(caught) == 1
    assert "WSMANAGER_PING_INTERVL is not a wsmanager variable" in str(caught[0].message)
    assert "did you mean WSMANAGER_PING_INTERVAL?" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config.from_env(env)  # once per process


# ---- one default, read by every part ----------------------------------------------------------

def test_the_manager_takes_its_options_from_the_table():
    m = WebSocketManager()
    for name in config.names("manager"):
        if name == "stale_timeout":
            assert m.stale_timeout == m.ping_interval + m.ping_timeout
        elif name == "redis_url":
            assert m.redis_url is None
        else:
            assert getattr(m, name) == config.option(name).default, name
    with pytest.raises(ConfigError, match=r"^send_timeout=0: must be > 0; accepted: "):
        WebSocketManager(send_timeout=0)
    with pytest.raises(ConfigError, match=r"^WSMANAGER_MAX_CONNECTIONS_PER_USER='-1': must be >= 0"):
        WebSocketManager.from_env({"WSMANAGER_MAX_CONNECTIONS_PER_USER": "-1"})


def test_configure_validates_without_building_a_registry(monkeypatch: pytest.MonkeyPatch):
    from wsmanager import manager as manager_module

    m = WebSocketManager(ping_interval=30, ping_timeout=10)

    def no_registry(*args, **kwargs):
        raise AssertionError("configure() built a registry")

    monkeypatch.setattr(manager_module._core, "Registry", no_registry)
    m.configure(ping_interval=5, max_connections_per_user=None, greeting=True)
    assert (m.ping_interval, m.stale_timeout, m.max_connections_per_user, m.greeting) == (5.0, 15.0, 0, True)
    assert m._registry.stale_after == 15.0
    m.configure(stale_timeout=100)
    assert m.stale_timeout == 100.0
    m.configure(ping_interval=0)  # no heartbeat, no stale detection
    assert m.stale_timeout == 0.0
    with pytest.raises(ConfigError, match=r"^ping_timeout=-1: must be >= 0"):
        m.configure(ping_timeout=-1)
    with pytest.raises(TypeError, match=r"^max_connections='5': not an int"):
        m.configure(max_connections="5")
    with pytest.raises(TypeError, match="unexpected keyword argument.*redis_url"):
        m.configure(redis_url="redis://127.0.0.1")
    assert m.ping_timeout == 10.0  # a refused call changed nothing


def test_the_engine_takes_the_tables_defaults(monkeypatch: pytest.MonkeyPatch):
    """uvicorn's own --ws-* defaults (20 s, 20 s, 16 MiB) do not replace the table's; flags set
    to something else do, below the variables and configure_engine()."""
    import wsmanager.uvicorn as native

    made: list[dict] = []

    class FakeEngine:
        def __init__(self, **options):
            made.append(options)
            self.options = options

    for name in list(os.environ):
        if name.startswith("WSMANAGER_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(native._core, "Engine", FakeEngine)
    monkeypatch.setattr(native, "_engine", None)
    monkeypatch.setattr(native, "_engine_overrides", {})
    monkeypatch.setattr(native, "_stop_engine", lambda: None)
    native.get_engine(Config(app="x:y"))
    assert made[-1] == config.defaults("engine")
    assert made[-1]["ping_interval"] == config.option("ping_interval").default == 30.0

    monkeypatch.setattr(native, "_engine", None)
    monkeypatch.setenv("WSMANAGER_SEND_TIMEOUT", "7")
    native.configure_engine(close_timeout=1, ping_interval=None)
    native.get_engine(Config(app="x:y", ws_ping_interval=12.0, ws_max_size=1000))
    assert made[-1] == {**config.defaults("engine"), "ping_interval": 12.0, "max_message_size": 1000,
                        "send_timeout": 7.0, "close_timeout": 1.0}
    with pytest.raises(RuntimeError, match="already running"):
        native.configure_engine(close_timeout=2)

    with pytest.raises(ConfigError, match=r"^--ws-ping-timeout=-1\.0: must be >= 0"):
        native.engine_options(Config(app="x:y", ws_ping_timeout=-1.0))
    with pytest.raises(ConfigError, match=r"^high_water=0: must be >= 1"):
        native.engine_options(high_water=0)
    monkeypatch.setattr(native, "_engine", None)
    with pytest.raises(ConfigError, match=r"^read_limit=0: must be >= 1"):
        native.configure_engine(read_limit=0)  # at the call, not at the engine's start
    with pytest.raises(TypeError, match="unexpected keyword argument.*max_size"):
        native.configure_engine(max_size=5)
    monkeypatch.setenv("WSMANAGER_EVENT_QUEUE_LIMIT", "lots")
    with pytest.raises(ConfigError, match=r"^WSMANAGER_EVENT_QUEUE_LIMIT='lots': not an integer"):
        native.get_engine(Config(app="x:y"))


def test_the_redis_backend_takes_the_tables_defaults(monkeypatch: pytest.MonkeyPatch):
    redis = pytest.importorskip("wsmanager.backends.redis")
    for name in list(os.environ):
        if name.startswith("WSMANAGER_"):
            monkeypatch.delenv(name)
    b = redis.RedisBackend("redis://127.0.0.1:1/0")
    expected = config.values("redis", {})
    assert {n: getattr(b, "url" if n == "redis_url" else n) for n in expected} == {
        **expected, "redis_url": "redis://127.0.0.1:1/0"}
    monkeypatch.setenv("WSMANAGER_REDIS_NODE_TTL", "3")
    monkeypatch.setenv("WSMANAGER_REDIS_URL", "redis://127.0.0.1:2/0")
    b = redis.RedisBackend(heartbeat_interval=0.5)
    assert (b.url, b.node_ttl, b.heartbeat_interval) == ("redis://127.0.0.1:2/0", 3.0, 0.5)
    with pytest.raises(ConfigError, match=r"^node_ttl=0\.1: must be >= 0\.2"):
        redis.RedisBackend(node_ttl=0.1)
    with pytest.raises(ConfigError, match=r"^heartbeat_interval \(WSMANAGER_REDIS_HEARTBEAT\) = 5: "
                                          r"must be shorter than node_ttl"):
        redis.RedisBackend(heartbeat_interval=5)
    with pytest.raises(TypeError, match=r"^max_pending=2\.5: not an int"):
        redis.RedisBackend(max_pending=2.5)
    with pytest.raises(ConfigError, match=r"^url='http://:\*\*\*@x': not a Redis URL"):
        redis.RedisBackend("http://:pw@x")


def test_the_router_reads_its_variable_from_the_table():
    from wsmanager import fastapi

    assert fastapi.ADMIN_TOKEN_ENV == config.option("admin_token").env == "WSMANAGER_ADMIN_TOKEN"


# ---- the README's table ------------------------------------------------------------------------

def _readme_table() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- configuration table: [^\n]*-->\n(.*?)\n<!-- end of configuration table -->",
                      text, re.S)
    assert found, "README.md has no generated Configuration table"
    return found.group(1)


def test_readme_lists_exactly_the_tables_variables_and_defaults():
    rows = [line.split(" | ") for line in _readme_table().splitlines()[2:]]
    listed = {cells[0].strip("| `"): cells[3] for cells in rows}
    assert listed == {o.env: config.default_text(o) for o in OPTIONS}
    assert _readme_table() == config.markdown_table(), \
        "README's Configuration table is stale: paste the output of `python -m wsmanager.config`"


# ---- start-up: a bad variable stops the server, naming it ---------------------------------------

def _serve(env: dict[str, str], app: str, plane: str = "native") -> tuple[ServerFailed, float]:
    """The server's failure to start (its exit code and output), and how long it took."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WSMANAGER_")}
    started = time.monotonic()
    try:
        server = AppServer(app, plane, via_main=plane == "native", log_level=None, ready_timeout=60,
                           environ={**clean, "PYTHONPATH": str(ROOT)}, env=env)
    except ServerFailed as failed:
        return failed, time.monotonic() - started
    server.stop()
    raise AssertionError("the server started:\n" + server.log())


@pytest.mark.parametrize("app, plane", [
    ("tests.native_support:echo_app", "native"),  # python -m wsmanager
    ("tests.wsapp:app", "uvicorn"),  # the portable plane: stock uvicorn, the app imports wsmanager
], ids=["python-m-wsmanager", "uvicorn-portable"])
def test_a_variable_of_the_wrong_type_stops_the_server_at_start_up(app, plane):
    proc, took = _serve({"WSMANAGER_MAX_MESSAGE_SIZE": "abc"}, app, plane)
    output = proc.output
    assert proc.returncode not in (0, None), output
    assert took < 30, took
    assert "ConfigError: WSMANAGER_MAX_MESSAGE_SIZE='abc': not an integer; accepted: an integer of bytes" \
        in output, output
    assert "Uvicorn running" not in output


def test_a_variable_out_of_range_stops_the_server_at_start_up():
    proc, took = _serve({"WSMANAGER_MAX_HANDSHAKES": "-1"}, "tests.native_support:echo_app")
    output = proc.output
    assert proc.returncode not in (0, None) and took < 30, output
    assert ("ConfigError: WSMANAGER_MAX_HANDSHAKES='-1': must be >= 0; accepted: an integer from 0 "
            "to 4294967295; 0 = no cap") in output, output
    assert "Uvicorn running" not in output


def test_a_bare_engine_has_the_tables_defaults() -> None:
    """_core.Engine()'s own keyword defaults (csrc/engine_py.c) are the table's."""
    from wsmanager import _core

    if not hasattr(_core, "Engine"):
        pytest.skip("no native engine on this platform")
    engine = _core.Engine()
    try:
        got = engine.options
    finally:
        engine.shutdown()
    table = config.defaults()
    assert got == {name: table[name] for name in got}
