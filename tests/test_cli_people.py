"""`keyrelay users|members`, `orgs|teams rename|delete`, scoped `tokens create`, `keys list --org|--team|--project`,
and `keyrelay login` with a personal access token, against a real publisher."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from tests.cli_support import Shell
from tests.cli_support import table_columns as columns
from tests.cli_support import table_rows as rows
from tests.support import ADMIN_TOKEN
from tests.test_cli import _details

USER_TABLE = ["ID", "EMAIL", "NAME", "STATUS", "CREATED"]
MEMBER_TABLE = ["USER", "EMAIL", "NAME", "ROLE", "STATUS", "SINCE"]
READER_WARNING = "platform-reader token(s)"


async def _bookshop(shell: Shell) -> dict[str, str]:
    """bookshop / payments / checkout and bookshop / search / indexer, a key in each: their ids by name."""
    ids = {"bookshop": (await shell.ok("orgs", "create", "bookshop", "--print", "id")).strip()}
    for team, project in (("payments", "checkout"), ("search", "indexer")):
        ids[team] = (await shell.ok("teams", "create", "--org", "bookshop", team, "--print", "id")).strip()
        ids[project] = (
            await shell.ok("projects", "create", "--org", "bookshop", "--team", team, project, "--print", "id")
        ).strip()
        made = await shell.ok(
            "keys",
            "create",
            "--org",
            "bookshop",
            "--team",
            team,
            "--project",
            project,
            "--name",
            f"{project}-key",
            "--print",
            "id",
        )
        ids[f"{project}-key"] = made.strip()
    return ids


async def test_users_are_added_by_email_listed_shown_and_deactivated_from_the_cli(shell: Shell) -> None:
    admin = shell.publisher.admin
    await _bookshop(shell)
    ann = _details(await shell.ok("users", "add", "ann@example.com", "--name", "Ann", "--org", "bookshop"))
    assert (ann["email"], ann["name"], ann["status"]) == ("ann@example.com", "Ann", "active")
    bob = await shell.json("users", "add", "bob@example.com")
    assert "conflict" in await shell.fails("users", "add", "ANN@example.com")  # the same person, in any case

    listed = await shell.ok("users", "list")
    assert columns(listed) == USER_TABLE
    assert [(r["EMAIL"], r["NAME"]) for r in rows(listed)] == [
        ("ann@example.com", "Ann"),
        ("bob@example.com", "-"),
    ]
    assert await shell.json("users", "list") == await admin.ok("GET", "/users")
    members = await shell.ok("members", "list", "--org", "bookshop")
    assert columns(members) == MEMBER_TABLE
    assert [(r["EMAIL"], r["ROLE"]) for r in rows(members)] == [("ann@example.com", "member")]
    assert _details(await shell.ok("users", "show", "Ann@Example.com"))["id"] == ann["id"]  # by email, any case
    assert (await shell.json("users", "show", bob["id"]))["email"] == "bob@example.com"
    missing = await shell.fails("users", "show", "carol@example.com")
    assert missing == "keyrelay: no user with the email 'carol@example.com' that this token may see\n"

    refused = await shell.fails("users", "deactivate", "ann@example.com")
    assert "without --yes: there is no terminal to ask on" in refused
    plan = await shell.ok("users", "deactivate", "ann@example.com", "--dry-run")
    assert plan.startswith(f"would deactivate user ann@example.com ({ann['id']}): their tokens stop")
    assert (await shell.json("users", "show", ann["id"]))["status"] == "active"  # the dry run changed nothing
    said = await shell.ok("users", "deactivate", "ann@example.com", "--yes")
    assert said.strip() == "deactivated ann@example.com; 0 key(s) revoked (published)"
    assert {r["EMAIL"]: r["STATUS"] for r in rows(await shell.ok("users", "list"))}["ann@example.com"] == (
        "deactivated"
    )


async def test_members_are_added_listed_and_removed_in_orgs_and_teams_and_leaving_revokes_keys(shell: Shell) -> None:
    admin = shell.publisher.admin
    ids = await _bookshop(shell)
    said = await shell.ok("members", "add", "--org", "bookshop", "ann@example.com", "--role", "member")
    assert said.strip() == "ann@example.com is now member"  # added by email: a new user
    assert "is not a member of the team's organization" in await shell.fails(
        "members", "add", "--team", "payments", "--org", "bookshop", "bob@example.com", "--role", "viewer"
    )
    await shell.ok("members", "add", "--org", "bookshop", "bob@example.com", "--role", "admin")
    await shell.ok(
        "members", "add", "--team", "payments", "--org", "bookshop", "ann@example.com", "--role", "developer"
    )
    promoted = await shell.json("members", "add", "--team", "payments", "ann@example.com", "--role", "maintainer")
    assert promoted["role"] == "maintainer"  # a second add changes the role
    team = await shell.ok("members", "list", "--team", "payments", "--org", "bookshop")
    assert [(r["EMAIL"], r["ROLE"]) for r in rows(team)] == [("ann@example.com", "maintainer")]
    org = rows(await shell.ok("members", "list", "--org", "bookshop"))
    assert sorted((r["EMAIL"], r["ROLE"]) for r in org) == [("ann@example.com", "member"), ("bob@example.com", "admin")]
    assert "give --org (organization members) or --team" in await shell.fails("members", "list")

    ann = (await admin.ok("GET", f"/orgs/{ids['bookshop']}/members"))["members"]
    ann_id = next(m["user_id"] for m in ann if m["email"] == "ann@example.com")
    token = await shell.json("tokens", "create", "ann-pat", "--user", "ann@example.com", "--role", "personal")
    status, key = await admin.call("POST", f"/projects/{ids['checkout']}/keys", {"name": "ann"}, token=token["token"])
    assert status == 201

    left = await shell.ok("members", "remove", "--team", "payments", "ann@example.com")  # a team asks nothing
    assert left.strip() == "removed ann@example.com; 0 key(s) revoked (published)"
    assert "without --yes" in await shell.fails("members", "remove", "--org", "bookshop", "ann@example.com")
    plan = await shell.json("members", "remove", "--org", "bookshop", "ann@example.com", "--dry-run")
    assert plan == {"id": ann_id, "dry_run": True}
    said = await shell.ok("members", "remove", "--org", "bookshop", "ann@example.com", "--yes")
    assert said.strip() == "removed ann@example.com; 1 key(s) revoked (published)"  # offboarding: revoke
    assert (await admin.ok("GET", f"/keys/{key['id']}"))["status"] == "revoked"
    assert [r["EMAIL"] for r in rows(await shell.ok("members", "list", "--org", "bookshop"))] == ["bob@example.com"]
    assert "not_found" in await shell.fails("members", "remove", "--org", "bookshop", ann_id, "--yes")


async def test_orgs_and_teams_are_renamed_and_deleted_and_a_deleted_teams_name_is_free_again(shell: Shell) -> None:
    admin = shell.publisher.admin
    ids = await _bookshop(shell)
    said = await shell.ok("orgs", "rename", "bookshop", "books")
    assert said.strip() == f"renamed bookshop to books ({ids['bookshop']})"
    assert (await shell.ok("teams", "rename", "--org", "books", "search", "discovery")).startswith(
        "renamed search to discovery"
    )
    assert "conflict" in await shell.fails("teams", "rename", "--org", "books", "discovery", "payments")
    assert [r["NAME"] for r in rows(await shell.ok("teams", "list", "--org", "books"))] == [
        "payments",
        "discovery",
    ]

    assert "without --yes" in await shell.fails("teams", "delete", "--org", "books", "payments")
    plan = await shell.ok("teams", "delete", "--org", "books", "payments", "--dry-run")
    assert plan.strip() == (
        f"would decommission team payments ({ids['payments']}): every project of it, revoking every key"
    )
    said = await shell.ok("teams", "delete", "--org", "books", "payments", "--yes")
    assert said.strip() == f"team {ids['payments']} decommissioned; 1 key(s) revoked (published)"
    assert (await admin.ok("GET", f"/keys/{ids['checkout-key']}"))["status"] == "revoked"
    again = (await shell.ok("teams", "create", "--org", "books", "payments", "--print", "id")).strip()
    assert again != ids["payments"]  # the name of a decommissioned team is free
    project = await shell.json("projects", "create", "--org", "books", "--team", "payments", "checkout")
    assert project["team_id"] == again  # names find the active team

    said = await shell.ok("orgs", "delete", "books", "--yes")
    assert said.strip() == f"organization {ids['bookshop']} decommissioned; 1 key(s) revoked (published)"
    assert (await admin.ok("GET", f"/keys/{ids['indexer-key']}"))["status"] == "revoked"


async def test_tokens_are_scoped_to_an_org_a_team_or_a_user_and_only_platform_readers_are_warned_about(
    shell: Shell,
) -> None:
    ids = await _bookshop(shell)
    await shell.ok("members", "add", "--org", "bookshop", "ann@example.com", "--role", "owner")
    owner = await shell.json("tokens", "create", "owner", "--org", "bookshop", "--role", "owner")
    lead = await shell.json("tokens", "create", "lead", "--team", "search", "--org", "bookshop", "--role", "maintainer")
    ann = await shell.json(
        "tokens", "create", "ann", "--user", "ann@example.com", "--org", "bookshop", "--role", "admin"
    )
    assert (owner["org_id"], owner["team_id"], owner["role"]) == (ids["bookshop"], None, "owner")
    assert (lead["org_id"], lead["team_id"], lead["role"]) == (None, ids["search"], "maintainer")
    assert (ann["org_id"], ann["user_id"] is not None, ann["role"]) == (ids["bookshop"], True, "admin")
    refused = await shell.fails("tokens", "create", "bad", "--team", "search", "--role", "owner")
    assert "owner is an organization role: give org_id" in refused

    quiet = await shell.run("tokens", "list")
    assert (quiet.code, quiet.err) == (0, "")  # no platform-reader: no warning
    assert {r["NAME"]: r["TEAM"] for r in rows(quiet.out)}["lead"] == ids["search"]
    reader = await shell.json("tokens", "create", "dashboard")
    warned = await shell.run("tokens", "list")
    assert f"1 active {READER_WARNING} (dashboard) read every organization's keys" in warned.err
    assert (await shell.run("tokens", "list", "--json")).err == ""  # JSON for scripts: no warning
    await shell.ok("tokens", "revoke", reader["id"])
    assert (await shell.run("tokens", "list")).err == ""  # a revoked one reads nothing

    # A team lead's token lists its team's tokens (and its own), never the org owner's.
    mine = await shell.run("tokens", "list", "--print", "name", token=lead["token"])
    assert mine.out.split() == ["lead"]


async def test_keys_list_narrows_to_an_org_a_team_or_a_project_and_asks_for_nothing_the_token_may_not_read(
    shell: Shell,
) -> None:
    ids = await _bookshop(shell)
    await shell.ok("orgs", "create", "globex")
    await shell.ok("teams", "create", "--org", "globex", "ops")
    await shell.ok("projects", "create", "--org", "globex", "--team", "ops", "pager")
    await shell.ok("keys", "create", "--org", "globex", "--team", "ops", "--project", "pager", "--name", "pager-key")

    async def names(*argv: str, token: str = ADMIN_TOKEN) -> list[str]:
        ran = await shell.run("keys", "list", *argv, "--print", "name", token=token)
        assert (ran.code, ran.err) == (0, ""), ran
        return sorted(ran.out.split())

    assert await names() == ["checkout-key", "indexer-key", "pager-key"]
    assert await names("--org", "bookshop") == ["checkout-key", "indexer-key"]
    assert await names("--org", "bookshop", "--team", "search") == ["indexer-key"]
    assert await names("--project", "checkout", "--org", "bookshop") == ["checkout-key"]
    member = await shell.json("tokens", "create", "org-member", "--org", "bookshop", "--role", "member")
    viewer = await shell.json("tokens", "create", "viewer", "--team", "search", "--org", "bookshop", "--role", "viewer")
    assert await names(token=viewer["token"]) == ["indexer-key"]
    assert await names("--org", "bookshop", token=viewer["token"]) == ["indexer-key"]
    audited = len((await shell.publisher.admin.ok("GET", "/audit", limit=1000))["entries"])
    assert await names("--org", "bookshop", token=member["token"]) == []  # sees projects, reads no key
    assert await names(token=member["token"]) == []
    assert await names("--team", "payments", "--org", "bookshop", token=member["token"]) == []
    after = (await shell.publisher.admin.ok("GET", "/audit", limit=1000))["entries"]
    assert len(after) == audited  # nothing was asked that could be refused: no access.refused entries
    refused = await shell.run("keys", "list", "--project", ids["checkout"], token=member["token"])
    assert (refused.code, "may not key.read here" in refused.err) == (1, True)  # sees the project, not its keys
    hidden = await shell.run("keys", "list", "--project", ids["checkout"], token=viewer["token"])
    assert f"no project with id '{ids['checkout']}' (not_found, HTTP 404)" in hidden.err  # another team's
    hidden = await shell.run("keys", "list", "--org", "globex", token=member["token"])
    assert "no organization named 'globex'; there are: bookshop" in hidden.err  # another org does not exist for it


async def test_keys_list_passes_every_filter_and_the_sort_to_the_org_and_team_routes(shell: Shell) -> None:
    ids = await _bookshop(shell)
    admin = shell.publisher.admin
    await shell.ok(
        "keys",
        "create",
        "--org",
        "bookshop",
        "--team",
        "payments",
        "--project",
        "checkout",
        "--name",
        "checkout-test",
        "--env",
        "test",
        "--scope",
        "orders:read",
        "--expires-in",
        "2d",
    )
    options = [
        "--status",
        "active",
        "--expiring-within",
        "3d",
        "--env",
        "test",
        "--region",
        "global",
        "--scope",
        "orders:read",
        "--created-by",
        "bookshop-admin@example.com",
        "--prefix",
        "checkout",
        "--unused-for",
        "0s",
        "--expires-before",
        "2100-01-01T00:00:00Z",
        "--sort=-name",
    ]
    await shell.ok("users", "add", "bookshop-admin@example.com", "--org", "bookshop")
    nobody = await shell.json("keys", "list", "--org", "bookshop", *options)
    assert nobody["keys"] == []  # that user made nothing
    options[options.index("bookshop-admin@example.com")] = (await admin.ok("GET", f"/keys/{ids['checkout-key']}"))[
        "created_by"
    ]  # the bootstrap token's id
    for where, path in (
        (["--org", "bookshop"], f"/orgs/{ids['bookshop']}/keys"),
        (["--team", "payments", "--org", "bookshop"], f"/teams/{ids['payments']}/keys"),
    ):
        listed = await shell.json("keys", "list", *where, *options)
        query = dict(zip([o.lstrip("-").replace("-", "_") for o in options[:-1:2]], options[1:-1:2], strict=True))
        direct = await admin.ok("GET", path, sort="-name", **query)
        assert [k["name"] for k in listed["keys"]] == [k["name"] for k in direct["keys"]] == ["checkout-test"]
    by_name = await shell.ok("keys", "list", "--org", "bookshop", "--sort=-name", "--print", "name")
    assert by_name.split() == ["indexer-key", "checkout-test", "checkout-key"]
    refused = await shell.fails("keys", "list", "--project", "checkout", "--org", "bookshop", "--status", "active")
    assert "give --org or --team instead of --project" in refused
    bad = await shell.fails("keys", "list", "--org", "bookshop", "--expiring-within", "soon")
    assert "expiring_within" in bad


async def test_login_with_a_personal_token_acts_as_that_person_until_logout(shell: Shell, tmp_path: Path) -> None:
    admin = shell.publisher.admin
    url = shell.publisher.url
    ids = await _bookshop(shell)
    globex = (await shell.ok("orgs", "create", "globex", "--print", "id")).strip()
    await shell.ok("members", "add", "--org", "bookshop", "ann@example.com", "--role", "member")
    await shell.ok(
        "members", "add", "--team", "payments", "--org", "bookshop", "ann@example.com", "--role", "developer"
    )
    token = (
        await shell.ok(
            "tokens", "create", "ann-laptop", "--user", "ann@example.com", "--role", "personal", "--print", "token"
        )
    ).strip()

    ran = await shell.run("login", "--url", url, auth=False, stdin=token + "\n")
    assert (ran.code, ran.err) == (0, "")
    path = tmp_path / "config" / "keyrelay" / "credentials"
    assert token not in ran.out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"url": url, "token": token}

    async def as_ann(*argv: str) -> tuple[int, str, str]:
        done = await shell.run(*argv, auth=False)
        return done.code, done.out, done.err

    made = await as_ann(
        "keys",
        "create",
        "--org",
        "bookshop",
        "--team",
        "payments",
        "--project",
        "checkout",
        "--name",
        "ann-dev",
        "--print",
        "id",
    )
    assert made[0] == 0
    code, out, _ = await as_ann("keys", "list", "--print", "name")
    assert (code, sorted(out.split())) == (0, ["ann-dev", "checkout-key"])  # her team's keys, not search's
    code, out, _ = await as_ann("orgs", "list", "--print", "name")
    assert (code, out.split()) == (0, ["bookshop"])  # globex does not exist for her
    code, _, err = await as_ann("keys", "show", ids["indexer-key"])
    assert (code, err) == (1, f"keyrelay: no key with id '{ids['indexer-key']}' (not_found, HTTP 404)\n")
    code, _, err = await as_ann("teams", "list", "--org", globex)
    assert code == 1
    assert "(not_found, HTTP 404)" in err
    code, _, err = await as_ann("keys", "revoke", ids["checkout-key"], "--reason", "mine to stop")
    assert code == 0  # anyone who sees a key may revoke it
    code, _, err = await as_ann("projects", "create", "--team", "payments", "--org", "bookshop", "mine")
    assert (code, "may not project.create here" in err) == (1, True)
    code, out, _ = await as_ann("tokens", "list", "--print", "name,role")
    assert out.splitlines() == ["ann-laptop\tpersonal"]  # her own tokens only

    audit = (await admin.ok("GET", "/audit", org_id=ids["bookshop"], limit=1000))["entries"]
    hers = [(e["action"], e["actor_kind"], e["source"]) for e in audit if e["actor"] == "ann@example.com"]
    assert hers[:2] == [("access.refused", "user", "cli"), ("key.revoke", "user", "cli")]
    assert ("key.create", "user", "cli") in hers

    out = (await shell.run("logout", auth=False)).out
    assert out == f"removed {path}\n"
    code, _, err = await as_ann("keys", "list", "--url", url)
    assert code == 1
    assert "send Authorization: Bearer" in err  # nobody is logged in any more
