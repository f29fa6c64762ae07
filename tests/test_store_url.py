"""The ``session_store`` URL: ``sqlite:PATH`` is parsed in one place (luafcgid.sessions)."""

from __future__ import annotations

import pytest

from luafcgid import config, sessions
from luafcgid.sessions.sqlite import SqliteStore


def test_sqlite_path_is_the_file_of_a_sqlite_url_and_none_for_another_store() -> None:
    assert sessions.sqlite_path(sessions.sqlite_url("/var/lib/s.db")) == "/var/lib/s.db"
    assert sessions.sqlite_path("sqlite:") == ""
    assert sessions.sqlite_path("redis://localhost:6379/0") is None
    assert sessions.sqlite_path("sqlite") is None


def test_a_sqlite_store_is_opened_on_its_file(tmp_path) -> None:
    url = sessions.sqlite_url(str(tmp_path / "s.db"))
    assert sessions.store_class(url) is SqliteStore
    store = sessions.open_store(url, config.from_mapping({}).session)
    assert (store.path, store.name) == (str(tmp_path / "s.db"), url)


@pytest.mark.parametrize("given, expected", [
    ("sqlite:sessions.db", "sqlite:/etc/luafcgid/sessions.db"),
    ("sqlite:/srv/s.db", "sqlite:/srv/s.db"),
    ("redis://localhost:6379/2", "redis://localhost:6379/2"),
])
def test_config_resolves_a_sqlite_file_from_the_config_directory(given: str,
                                                                 expected: str) -> None:
    assert config.session_store(given, "/etc/luafcgid") == expected


def test_the_derived_store_is_a_sqlite_file_beside_the_pidfile() -> None:
    settings = config.from_mapping({"pidfile": "/run/lf/luafcgid.pid"})
    assert sessions.sqlite_path(settings.session_store) == (
        "/run/lf/" + config.SESSION_DIR + "/sessions.db")
