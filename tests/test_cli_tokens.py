"""`keyrelay tokens create|list|revoke`, `keyrelay login` and `keyrelay logout` against a real publisher."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from keyrelay.cli import main
from tests.cli_support import Shell, table_columns, table_rows
from tests.support import ADMIN_TOKEN


def _credentials(tmp_path: Path) -> Path:
    return tmp_path / "config" / "keyrelay" / "credentials"


async def test_tokens_are_created_with_an_expiry_listed_and_revoked_from_the_cli(shell: Shell) -> None:
    created = await shell.json("tokens", "create", "ci", "--role", "platform-admin", "--expires-in", "1h")
    assert (created["name"], created["role"], created["status"]) == ("ci", "platform-admin", "active")
    assert created["expires_at"] is not None
    said = await shell.ok("tokens", "create", "dashboard")
    assert said.startswith("token for dashboard (platform-reader), shown once: krat_")

    ran = await shell.run("tokens", "list")
    listed = ran.out
    # A platform-reader token reads every organization: the listing says so (on stderr, tables stay clean).
    assert ran.err == (
        "keyrelay: warning: 1 active platform-reader token(s) (dashboard) read every organization's "
        "keys and audit trail (cross-tenant); scope them with --org or --team where you can\n"
    )
    assert table_columns(listed) == [
        "ID",
        "NAME",
        "ROLE",
        "ORG",
        "TEAM",
        "USER",
        "STATUS",
        "DISPLAY",
        "CREATED",
        "EXPIRES",
        "REVOKED",
    ]
    rows = {r["NAME"]: r for r in table_rows(listed)}
    assert set(rows) == {"bootstrap", "ci", "dashboard"}
    assert rows["ci"]["DISPLAY"] == f"krat_…{created['token'][-4:]}"
    assert rows["ci"]["EXPIRES"].startswith("20")
    assert created["token"][5:-6] not in listed
    api = await shell.publisher.admin.ok("GET", "/tokens")
    assert await shell.json("tokens", "list") == api
    few = await shell.json("tokens", "list", "--limit", "2")
    assert [t["name"] for t in few["tokens"]] == ["bootstrap", "ci"]

    revoked = await shell.ok("tokens", "revoke", created["id"])
    assert revoked.strip() == f"revoked token {created['id']} (ci, platform-admin)"
    assert {r["NAME"]: r["STATUS"] for r in table_rows((await shell.run("tokens", "list")).out)}["ci"] == "revoked"
    refused = await shell.fails("orgs", "list", "--url", shell.publisher.url, "--token", created["token"], auth=False)
    assert refused == "keyrelay: the admin token is not valid (unauthorized, HTTP 401)\n"
    missing = await shell.fails("tokens", "revoke", "0190c0de-0000-7000-8000-00000000beef")
    assert "no token with id" in missing


async def test_login_reads_the_token_from_stdin_keeps_it_readable_by_its_owner_only_and_commands_use_it(
    shell: Shell, tmp_path: Path
) -> None:
    url = shell.publisher.url
    ran = await shell.run("login", "--url", url, auth=False, stdin=ADMIN_TOKEN + "\n")
    assert (ran.code, ran.err) == (0, "")
    path = _credentials(tmp_path)
    assert ran.out == f"logged in to {url}; the token is in {path} (readable by you only)\n"
    assert ADMIN_TOKEN not in ran.out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"url": url, "token": ADMIN_TOKEN}

    await shell.ok("orgs", "create", "acme")
    listed = await shell.run("orgs", "list", "--json", auth=False)  # no flag, no variable: the login
    assert (listed.code, [o["name"] for o in json.loads(listed.out)["orgs"]]) == (0, ["acme"])

    said = await shell.run("logout", auth=False)
    assert (said.code, said.out) == (0, f"removed {path}\n")
    assert not path.exists()
    again = await shell.run("logout", auth=False)
    assert again.out == f"not logged in ({path} does not exist)\n"
    gone = await shell.run("orgs", "list", "--url", url, auth=False)
    assert gone.code == 1
    assert "send Authorization: Bearer" in gone.err


async def test_login_refuses_a_token_the_publisher_refuses_and_stores_nothing(shell: Shell, tmp_path: Path) -> None:
    for stdin in ("krat_" + "a" * 49 + "\n", "\n"):
        ran = await shell.run("login", "--url", shell.publisher.url, auth=False, stdin=stdin)
        assert ran.code == 1
        assert ran.out == ""
        assert ran.err.startswith("keyrelay: ")
        assert "krat_" + "a" * 49 not in ran.err
    assert not _credentials(tmp_path).exists()
    with pytest.raises(SystemExit):
        main(["login", "--token", ADMIN_TOKEN])  # a token is never an argument


async def test_a_variable_wins_over_the_login_and_the_login_over_a_running_stack(
    shell: Shell, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = shell.publisher.url
    await shell.ok("orgs", "create", "acme")
    member = (await shell.ok("tokens", "create", "reader", "--print", "token")).strip()
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "stack.json").write_text(json.dumps({"publisher_url": url, "admin_token": "krt_" + "x" * 43}))
    monkeypatch.setenv("KEYRELAY_DATA_DIR", str(stack))
    assert (await shell.run("orgs", "list", auth=False)).code == 1  # the stack's (wrong) token

    assert (await shell.run("login", "--url", url, auth=False, stdin=member)).code == 0
    assert (await shell.run("orgs", "list", auth=False)).code == 0  # the login, over the stack file
    refused = await shell.run("orgs", "create", "x", auth=False)
    assert refused.err.endswith(
        "may not org.create here; docs/permissions.md lists who may (forbidden, HTTP 403)\n"
    )  # the member

    monkeypatch.setenv("KEYRELAY_TOKEN", ADMIN_TOKEN)  # the variable, over the login
    assert (await shell.run("orgs", "create", "globex", auth=False)).code == 0
    monkeypatch.delenv("KEYRELAY_TOKEN")

    other = url.replace("127.0.0.1", "localhost")  # the same publisher under another URL
    elsewhere = await shell.run("orgs", "list", "--url", other, "--data-dir", str(tmp_path / "none"), auth=False)
    assert elsewhere.code == 1
    assert "send Authorization: Bearer" in elsewhere.err  # the login's token is only sent to the login's URL
