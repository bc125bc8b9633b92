"""State on disk is private: ``SAFEGATE_HOME`` 0700, the SQLite database and its side files 0600.

The audit store keeps raw flagged text in the database, so the files are checked after the
real app has recorded a flagged moderation input, on a fresh home and on one an older
version left open to other users.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway.config import Settings
from safegate.database import SQLITE_SIDE_SUFFIXES, make_engine, private_directory
from safegate.settings import DATABASE_FILE
from tests.gateway.conftest import EngineFactory, ready_client

FLAGGED = "All Muslims are terrorists and should be thrown out of this country."


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def database_files(home: Path) -> dict[str, int]:
    """The database file and whichever side files exist, with their modes."""
    database = home / DATABASE_FILE
    paths = [database, *(database.with_name(database.name + s) for s in SQLITE_SIDE_SUFFIXES)]
    return {path.name: mode(path) for path in paths if path.exists()}


def flag_one_text(settings: Settings, engine_factory: EngineFactory) -> None:
    client = ready_client(settings, engine_factory)
    try:
        response = client.post("/v1/moderations", json={"input": FLAGGED})
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["flagged"] is True
        stored = client.app.state.runtime.audit.list_items().items  # type: ignore[attr-defined]
        assert [stored_item.item.text for stored_item in stored] == [FLAGGED]
        # Checked while the app holds the database open: the -wal and -shm files exist now.
        files = database_files(settings.home_dir)
        assert {f"{DATABASE_FILE}-wal", f"{DATABASE_FILE}-shm"} <= set(files)
        assert files == dict.fromkeys(files, 0o600)
    finally:
        client.__exit__(None, None, None)


def test_a_fresh_home_and_its_audit_database_are_private(
    settings: Settings, engine_factory: EngineFactory
) -> None:
    assert not settings.home_dir.exists()
    flag_one_text(settings, engine_factory)
    assert mode(settings.home_dir) == 0o700
    files = database_files(settings.home_dir)
    assert DATABASE_FILE in files
    assert files == dict.fromkeys(files, 0o600)


def test_a_home_left_open_is_tightened_and_says_so(
    settings: Settings, engine_factory: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    home = settings.home_dir
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)  # noqa: S103 - the loose home under test, whatever the umask
    database = home / DATABASE_FILE
    engine = make_engine(f"sqlite:///{database}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE leftover (id INTEGER)"))
    # The pooled connection stays open, so the -wal and -shm files stay: set them (and the
    # database) to 0644, as an older version left them.
    for path in [database, *(database.with_name(database.name + s) for s in ("-wal", "-shm"))]:
        os.chmod(path, 0o644)
    storage_log = logging.getLogger("safegate.storage")
    storage_log.addHandler(caplog.handler)  # the app's logging does not propagate to root
    try:
        flag_one_text(settings, engine_factory)
    finally:
        storage_log.removeHandler(caplog.handler)
        engine.dispose()

    assert mode(home) == 0o700
    files = database_files(home)
    assert files == dict.fromkeys(files, 0o600)
    tightened = [r for r in caplog.records if r.name == "safegate.storage"]
    assert {r.getMessage() for r in tightened} == {
        "state directory was open to other users; tightened",
        "database file was open to other users; tightened",
    }
    assert {getattr(r, "mode_was", None) for r in tightened} == {"0755", "0644"}


def test_a_loose_directory_someone_else_owns_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # noqa: S103 - the loose directory under test

    def not_yours(path: object, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", not_yours)
    with pytest.raises(PermissionError, match=r"SAFEGATE_HOME .* is open to other users"):
        private_directory(shared, what="SAFEGATE_HOME")
