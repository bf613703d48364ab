"""The admin commands (`keyrelay orgs|teams|projects|keys|audit|tokens`) against a real publisher."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import pytest

from keyrelay.natsd import free_port
from tests.cli_support import Ran, Shell, table_columns, table_rows
from tests.support import ADMIN_TOKEN

GHOST = "0190c0de-0000-7000-8000-00000000beef"
KEYS_TABLE = ["ID", "NAME", "DISPLAY", "STATUS", "SCOPES", "REGION", "EXPIRES", "LAST USED"]


def _details(text: str) -> dict[str, str]:
    """`label  value` lines as a dict."""
    pairs = (re.split(r" {2,}", line.strip(), maxsplit=1) for line in text.strip().splitlines())
    return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}


async def _project(shell: Shell) -> tuple[str, str, str]:
    """Org, team and project ids, made with --print id."""
    org = (await shell.ok("orgs", "create", "acme", "--print", "id")).strip()
    team = (await shell.ok("teams", "create", "--org", org, "platform", "--print", "id")).strip()
    project = (await shell.ok("projects", "create", "--team", team, "payments", "--print", "id")).strip()
    return org, team, project


async def test_orgs_teams_and_projects_are_created_and_listed_and_decommissioning_revokes_every_key(
    shell: Shell,
) -> None:
    admin = shell.publisher.admin
    org, team, project = await _project(shell)
    assert [o["id"] for o in (await admin.ok("GET", "/orgs"))["orgs"]] == [org]

    shown = _details(await shell.ok("orgs", "create", "globex"))
    assert list(shown) == ["id", "name", "created"]
    assert shown["name"] == "globex"
    listed = await shell.ok("orgs", "list")
    assert table_columns(listed) == ["ID", "NAME", "CREATED"]
    assert [(r["ID"], r["NAME"]) for r in table_rows(listed)] == [(org, "acme"), (shown["id"], "globex")]
    assert await shell.json("orgs", "list") == await admin.ok("GET", "/orgs")
    team_answer = await shell.json("teams", "create", "--org", org, "search")
    assert team_answer in (await admin.ok("GET", f"/orgs/{org}/teams"))["teams"]
    assert [r["NAME"] for r in table_rows(await shell.ok("teams", "list", "--org", org))] == ["platform", "search"]

    keys = [
        (await shell.ok("keys", "create", "--project", project, "--name", f"k{i}", "--print", "id")).strip()
        for i in range(2)
    ]
    said = await shell.ok("projects", "decommission", project, "--yes")
    assert said.strip() == f"project {project} decommissioned; 2 key(s) revoked (published)"
    assert {(await admin.ok("GET", f"/keys/{k}"))["status"] for k in keys} == {"revoked"}
    projects = await shell.ok("projects", "list", "--team", team)
    assert table_columns(projects) == ["ID", "NAME", "DECOMMISSIONED"]
    assert table_rows(projects)[0]["DECOMMISSIONED"].startswith("20")
    assert await shell.json("projects", "list", "--team", team) == await admin.ok("GET", f"/teams/{team}/projects")


async def test_a_key_is_created_listed_shown_rotated_and_revoked_from_the_shell(shell: Shell) -> None:
    admin = shell.publisher.admin
    _, _, project = await _project(shell)

    created = await shell.ok(
        "keys",
        "create",
        "--project",
        project,
        "--name",
        "payments-prod",
        "--scope",
        "orders:read,orders:write",
        "--expires-in",
        "90d",
        "--meta",
        "owner=billing",
    )
    first, rest = created.split("\n", 1)
    plaintext = first.removeprefix("key (shown once, store it now): ")
    assert plaintext.startswith("kr_live_"), first
    fields = _details(rest)
    assert fields["scopes"] == "orders:read orders:write"
    assert fields["propagation"] == "published"
    key_id = fields["id"]

    listed = await shell.ok("keys", "list", "--project", project)
    assert table_columns(listed) == KEYS_TABLE
    (row,) = table_rows(listed)
    assert (row["ID"], row["NAME"], row["STATUS"]) == (key_id, "payments-prod", "active")
    assert row["DISPLAY"] == f"kr_live_…{plaintext[-4:]}"
    assert (row["REGION"], row["LAST USED"]) == ("-", "-")
    assert plaintext not in listed
    api_list = await admin.ok("GET", f"/projects/{project}/keys")
    assert await shell.json("keys", "list", "--project", project) == {"keys": api_list["keys"], "next_cursor": None}

    shown = await shell.ok("keys", "show", key_id)
    assert list(_details(shown))[:4] == ["id", "name", "display", "status"]
    assert (_details(shown)["project"], _details(shown)["metadata"]) == (project, "owner=billing")
    assert await shell.json("keys", "show", key_id) == await admin.ok("GET", f"/keys/{key_id}")

    new_id, new_key = (await shell.ok("keys", "rotate", key_id, "--grace", "1h", "--print", "id,key")).split()
    assert new_key.startswith("kr_live_")
    assert new_id != key_id
    old = await admin.ok("GET", f"/keys/{key_id}")
    assert old["rotated_to"] == new_id
    rotated = await shell.ok("keys", "rotate", new_id)
    assert rotated.startswith(f"old key {new_id} now expires at ")
    assert "key (shown once, store it now): kr_live_" in rotated

    revoked = await shell.ok("keys", "revoke", key_id, "--reason", "leaked")
    assert revoked.strip() == f"revoked {key_id} ({row['DISPLAY']}); propagation: published"
    answer = await shell.json("keys", "revoke", new_id)
    assert answer == {**await admin.ok("GET", f"/keys/{new_id}"), "already_revoked": False, "propagation": "published"}
    assert (await admin.ok("GET", f"/keys/{key_id}"))["revoked_reason"] == "leaked"


async def test_keys_listed_in_a_file_or_on_stdin_are_revoked_in_one_call(shell: Shell, tmp_path: Path) -> None:
    admin = shell.publisher.admin
    _, _, project = await _project(shell)
    created = await shell.json("keys", "create", "--project", project, "--name", "batch", "--count", "4")
    ids = [k["id"] for k in created["keys"]]
    assert [k["name"] for k in created["keys"]] == ["batch-1", "batch-2", "batch-3", "batch-4"]
    await admin.ok("POST", f"/keys/{ids[0]}/revoke")
    listing = tmp_path / "ids.txt"
    listing.write_text(f"# leaked in the incident\n{ids[0]}\n\n{ids[1]}  # ci\n{ids[2]}\n")

    said = await shell.ok("keys", "revoke", "--bulk", str(listing), "--reason", "incident", "--yes")
    assert said.strip() == ("revoked 2 key(s) in one transaction; 1 were already revoked; propagation: published")
    statuses = [(await admin.ok("GET", f"/keys/{k}"))["status"] for k in ids]
    assert statuses == ["revoked", "revoked", "revoked", "active"]
    answer = json.loads(await shell.ok("keys", "revoke", "--bulk", "-", "--json", "--yes", stdin=f"{ids[3]}\n"))
    assert answer == {"revoked": [ids[3]], "already_revoked": [], "propagation": "published"}
    assert "name key ids" in await shell.fails("keys", "revoke")


async def test_the_audit_trail_is_printed_as_a_table_or_as_the_apis_json(shell: Shell) -> None:
    admin = shell.publisher.admin
    _, _, project = await _project(shell)
    key_id = (await shell.ok("keys", "create", "--project", project, "--name", "k", "--print", "id")).strip()
    await shell.ok("keys", "revoke", key_id, "--reason", "done")

    trail = await shell.ok("audit", "--project", project)
    assert table_columns(trail) == ["AT", "ACTOR", "ACTION", "PROJECT", "KEY", "DETAILS"]
    rows = table_rows(trail)
    assert [(r["ACTOR"], r["ACTION"], r["KEY"]) for r in rows] == [
        ("bootstrap", "key.revoke", key_id),
        ("bootstrap", "key.create", key_id),
        ("bootstrap", "project.create", "-"),
    ]
    assert rows[0]["DETAILS"] == "reason=done"
    assert {r["PROJECT"] for r in rows} == {project}
    audit = await admin.ok("GET", "/audit", key_id=key_id)
    assert await shell.json("audit", "--key", key_id) == {"entries": audit["entries"], "next_cursor": None}
    assert len((await shell.json("audit", "--limit", "2"))["entries"]) == 2


async def test_signing_keys_prints_the_publishers_public_keys_as_a_table_json_or_just_the_current_one(
    shell: Shell,
) -> None:
    signer = shell.publisher.services.keys.signer
    assert (await shell.ok("signing-keys", "--print", "public_key")).strip() == signer.public_key
    assert await shell.json("signing-keys") == await shell.publisher.admin.ok("GET", "/signing-keys")
    listed = await shell.ok("signing-keys")
    assert table_columns(listed) == ["ID", "ALGORITHM", "PUBLIC KEY"]
    assert table_rows(listed) == [{"ID": signer.kid, "ALGORITHM": "Ed25519", "PUBLIC KEY": signer.public_key}]


async def test_print_gives_just_the_fields_asked_for_or_says_which_one_is_missing(shell: Shell) -> None:
    _, _, project = await _project(shell)
    out = await shell.ok("keys", "create", "--project", project, "--name", "k", "--print", "id,name,status")
    key_id, name, status = out.split()
    assert (name, status) == ("k", "active")
    assert (await shell.ok("keys", "show", key_id, "--print", "display")).strip().startswith("kr_live_…")
    missing = await shell.fails("keys", "show", key_id, "--print", "id,colour")
    assert missing.startswith("keyrelay: --print: no field 'colour'; there are: ")
    assert "display" in missing


async def test_the_url_and_token_come_from_flags_before_variables_before_the_stack_file(
    shell: Shell, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url, dead = shell.publisher.url, f"http://127.0.0.1:{free_port()}"
    await shell.ok("orgs", "create", "acme")
    expected = await shell.publisher.admin.ok("GET", "/orgs")

    async def orgs(*flags: str) -> Ran:
        return await shell.run("orgs", "list", "--json", *flags, auth=False)

    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "admin-token").write_text(ADMIN_TOKEN + "\n")
    (stack / "stack.json").write_text(
        json.dumps({"publisher_url": url, "admin_token_file": str(stack / "admin-token")})
    )
    found = await orgs("--data-dir", str(stack))  # how the CLI finds a running `keyrelay up`
    assert (found.code, json.loads(found.out)) == (0, expected)

    monkeypatch.setenv("KEYRELAY_URL", url)
    monkeypatch.setenv("KEYRELAY_TOKEN", ADMIN_TOKEN)
    from_env = await orgs()
    assert (from_env.code, json.loads(from_env.out)) == (0, expected)

    monkeypatch.setenv("KEYRELAY_URL", dead)
    monkeypatch.setenv("KEYRELAY_TOKEN", "krt_stale")
    flags_win = await orgs("--url", url, "--token", ADMIN_TOKEN)
    assert (flags_win.code, json.loads(flags_win.out)) == (0, expected)
    over_stack = await orgs("--data-dir", str(stack))  # variables, even wrong ones, come before the stack file
    assert over_stack.code != 0
    assert over_stack.err.startswith(f"keyrelay: cannot reach the publisher at {dead}")

    monkeypatch.setenv("KEYRELAY_URL", url)
    monkeypatch.setenv("KEYRELAY_TOKEN", ADMIN_TOKEN)
    wrong_flag = await orgs("--token", "krt_wrong")  # a flag wins even when the variable would have worked
    assert (wrong_flag.code, wrong_flag.out) == (1, "")
    assert wrong_flag.err == "keyrelay: the admin token is not valid (unauthorized, HTTP 401)\n"


async def test_the_installed_command_reads_its_url_and_token_from_the_environment(shell: Shell, tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "KEYRELAY_URL": shell.publisher.url,
        "KEYRELAY_TOKEN": ADMIN_TOKEN,
        "KEYRELAY_DATA_DIR": str(tmp_path / "no-stack-here"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    command = Path(sys.executable).parent / "keyrelay"
    process = await asyncio.create_subprocess_exec(
        str(command),
        "orgs",
        "create",
        "from-env",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert (process.returncode, err) == (0, b"")
    assert json.loads(out) in (await shell.publisher.admin.ok("GET", "/orgs"))["orgs"]


async def test_an_api_error_is_printed_on_stderr_with_the_apis_message_and_a_non_zero_exit(shell: Shell) -> None:
    admin = shell.publisher.admin
    for argv, path in (
        (("keys", "show", GHOST), f"/keys/{GHOST}"),
        (("keys", "show", "not-an-id"), "/keys/not-an-id"),
        (("teams", "list", "--org", GHOST), f"/orgs/{GHOST}/teams"),
    ):
        status, answer = await admin.call("GET", path)
        error = answer["error"]
        assert await shell.fails(*argv) == f"keyrelay: {error['message']} ({error['code']}, HTTP {status})\n"
    status, answer = await admin.call("POST", f"/keys/{GHOST}/revoke", {})
    assert answer["error"]["message"] in await shell.fails("keys", "revoke", GHOST)

    bad_token = await shell.fails("orgs", "list", "--url", shell.publisher.url, "--token", "krt_wrong", auth=False)
    assert bad_token == "keyrelay: the admin token is not valid (unauthorized, HTTP 401)\n"
    member = (await shell.ok("tokens", "create", "dashboard", "--role", "platform-reader", "--print", "token")).strip()
    read = await shell.run("orgs", "list", "--json", "--url", shell.publisher.url, "--token", member, auth=False)
    assert read.code == 0
    refused = await shell.fails("orgs", "create", "x", "--url", shell.publisher.url, "--token", member, auth=False)
    assert refused.endswith("may not org.create here; docs/permissions.md lists who may (forbidden, HTTP 403)\n")
    assert (await admin.ok("GET", "/orgs"))["orgs"] == []  # a refused command changed nothing
    nobody = await shell.fails("orgs", "list", "--url", f"http://127.0.0.1:{free_port()}", auth=False)
    assert "cannot reach the publisher" in nobody


def test_names_holding_control_characters_are_printed_escaped_never_raw() -> None:
    from keyrelay.output import details, table

    row = {"id": "x", "name": "evil\r\nX-Injected: 1 \x1b[31mred\x1b[0m é"}
    printed = table([row], [("id", "id"), ("name", "name")]) + details(row, [("name", "name")])
    assert "\r" not in printed
    assert "\x1b" not in printed
    assert "evil\\x0d\\x0aX-Injected: 1 \\x1b[31mred\\x1b[0m é" in printed  # security review L4


async def test_listing_commands_follow_cursors_page_after_page_up_to_their_limit(shell: Shell) -> None:
    admin = shell.publisher.admin
    org, _, project = await _project(shell)
    for name in ("b", "c", "d"):
        await admin.ok("POST", "/orgs", {"name": name})
    orgs = (await admin.ok("GET", "/orgs"))["orgs"]
    two = await shell.json("orgs", "list", "--limit", "2")
    assert two["orgs"] == orgs[:2]
    assert two["next_cursor"] == (await admin.ok("GET", "/orgs", limit=2))["next_cursor"]
    assert await shell.json("orgs", "list") == {"orgs": orgs, "next_cursor": None}

    for _ in range(2):  # two bulk calls: more keys than the API puts on one page
        await admin.ok("POST", f"/projects/{project}/keys/bulk", {"keys": [{"name": "k"}] * 501})
    listed = await shell.json("keys", "list", "--project", project, "--limit", "1002")
    assert len(listed["keys"]) == len({k["id"] for k in listed["keys"]}) == 1002
    assert listed["next_cursor"] is None
    assert len((await shell.json("keys", "list", "--project", project))["keys"]) == 100  # the default limit
    cut = await shell.run("audit", "--org", org, "--limit", "2")
    assert (cut.code, len(table_rows(cut.out))) == (0, 2)
    assert "2 entries shown, and there are more: --all for every one, or --cursor " in cut.err  # never silently
    assert "at least 1" in await shell.fails("orgs", "list", "--limit", "0")


async def test_destructive_commands_ask_need_yes_without_a_terminal_and_dry_run_changes_nothing(
    shell: Shell,
) -> None:
    admin = shell.publisher.admin
    _, _, project = await _project(shell)
    ids = [
        (await shell.ok("keys", "create", "--project", project, "--name", f"k{i}", "--print", "id")).strip()
        for i in range(3)
    ]
    audit = await admin.ok("GET", "/audit")

    for argv in (("projects", "decommission", project), ("keys", "revoke", *ids)):
        refused = await shell.fails(*argv)
        assert "without --yes: there is no terminal to ask on (--dry-run shows what would change)" in refused
    plan = await shell.json("projects", "decommission", project, "--dry-run")
    assert (sorted(plan["would_revoke"]), plan["dry_run"]) == (sorted(ids), True)
    shown = await shell.ok("keys", "revoke", *ids, "--dry-run")
    assert shown.startswith("would revoke 3 key(s) in one transaction; 0 already are")
    assert await admin.ok("GET", "/audit") == audit  # neither changed a thing
    assert {(await admin.ok("GET", f"/keys/{k}"))["status"] for k in ids} == {"active"}


async def test_names_work_wherever_ids_do_and_an_ambiguous_name_lists_the_candidates(shell: Shell) -> None:
    org, _, project = await _project(shell)  # acme / platform / payments
    await shell.json("orgs", "create", "globex")
    await shell.json("teams", "create", "--org", "globex", "platform")
    assert (await shell.ok("teams", "create", "--org", "acme", "search", "--print", "org_id")).strip() == org
    key = await shell.json("keys", "create", "--project", "payments", "--name", "by-name")
    assert key["project_id"] == project

    ambiguous = await shell.fails("projects", "list", "--team", "platform")
    assert "2 teams are named 'platform': acme/platform (" in ambiguous
    assert "globex/platform (" in ambiguous
    assert "narrow it with --org" in ambiguous
    listed = await shell.json("projects", "list", "--team", "platform", "--org", "acme")
    assert [p["id"] for p in listed["projects"]] == [project]
    unknown = await shell.fails("keys", "list", "--project", "payroll")
    assert unknown == "keyrelay: no project named 'payroll'; there are: payments\n"


async def test_print_gives_one_tab_separated_line_per_item_and_no_python_reprs(shell: Shell) -> None:
    _, _, project = await _project(shell)
    created = await shell.ok(
        "keys", "create", "--project", project, "--name", "b", "--count", "3", "--print", "id,name,scopes,region"
    )
    lines = [line.split("\t") for line in created.splitlines()]
    assert [(name, scopes, region) for _, name, scopes, region in lines] == [
        ("b-1", "", ""),
        ("b-2", "", ""),
        ("b-3", "", ""),  # an empty list and a null are empty, never [] or None
    ]
    listed = await shell.ok("keys", "list", "--project", project, "--print", "id,status")
    assert sorted(listed.splitlines()) == sorted(f"{key_id}\tactive" for key_id, *_ in lines)
    every = await shell.ok("keys", "list", "--project", project, "--all", "--print", "name")
    assert sorted(every.split()) == ["b-1", "b-2", "b-3"]


async def test_creating_what_exists_can_hand_back_the_existing_one(shell: Shell) -> None:
    org, team, project = await _project(shell)
    assert "conflict" in await shell.fails("orgs", "create", "acme")
    again = await shell.run("orgs", "create", "acme", "--if-not-exists", "--print", "id")
    assert (again.code, again.out.strip()) == (0, org)
    assert again.err == f"keyrelay: the organization 'acme' exists already ({org})\n"
    team_again = await shell.run("teams", "create", "--org", "acme", "platform", "--if-not-exists", "--print", "id")
    project_again = await shell.run(
        "projects", "create", "--team", team, "payments", "--if-not-exists", "--print", "id"
    )
    assert (team_again.out.strip(), project_again.out.strip()) == (team, project)


async def test_keys_list_without_a_project_lists_every_key_the_token_may_see_org_by_org(
    shell: Shell,
) -> None:
    _, _, payments = await _project(shell)
    search = await shell.json("projects", "create", "--team", "platform", "search")
    made = {
        (await shell.json("keys", "create", "--project", project, "--name", name))["id"]: project
        for project, name in ((payments, "p"), (search["id"], "s1"), (search["id"], "s2"))
    }
    listed = await shell.json("keys", "list")
    assert {k["id"]: k["project_id"] for k in listed["keys"]} == made
    assert [k["id"] for k in (await shell.json("keys", "list", "--team", "platform", "--org", "acme"))["keys"]] == [
        k["id"] for k in listed["keys"]
    ]
    cut = await shell.run("keys", "list", "--limit", "2")
    assert len(table_rows(cut.out)) == 2
    assert "2 keys shown, and there may be more: --all for every one, or --org" in cut.err
    assert "--cursor goes on within one organization's or team's keys" in await shell.fails(
        "keys", "list", "--cursor", "x"
    )
