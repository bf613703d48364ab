"""The sign-in settings and the group map file, checked at start-up: docs/sign-in.md's example is a valid map,
every mistake an operator can make is refused naming the flag, the entry and the fix, and a person's groups
give the highest role each place is mapped to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from keyrelay.cli import build_parser
from keyrelay.core.config import load
from keyrelay.core.errors import SettingsError
from publisher.oidc_groups import Mapping, Wanted, parse_group_map
from publisher.settings import PublisherSettings

SIGN_IN_DOC = Path(__file__).resolve().parent.parent / "docs" / "sign-in.md"


def _documented_map() -> bytes:
    blocks = re.findall(r"```toml\n(.*?)```", SIGN_IN_DOC.read_text(), re.DOTALL)
    assert len(blocks) == 1, "docs/sign-in.md shows one group map"
    return str(blocks[0]).encode()


def test_the_documented_group_map_is_valid_and_gives_the_highest_role_per_place() -> None:
    groups = parse_group_map(_documented_map())
    assert groups.mappings[2] == Mapping("payments-developers", "acme", "payments", "developer")
    assert groups.wanted(["acme-engineering", "keyrelay-acme-owners"]) == {"acme": Wanted("owner", {})}
    assert groups.wanted(["payments-developers"]) == {"acme": Wanted("member", {"payments": "developer"})}
    assert groups.wanted(["someone-elses-group"]) == {}


def test_roles_combine_to_the_highest_in_each_organization_and_team() -> None:
    groups = parse_group_map(b"""
        [[map]]
        group = "a"
        org = "acme"
        team = "web"
        role = "viewer"
        [[map]]
        group = "b"
        org = "acme"
        team = "web"
        role = "maintainer"
        [[map]]
        group = "c"
        org = "acme"
        role = "admin"
        [[map]]
        group = "c"
        org = "globex"
        role = "member"
    """)
    assert groups.wanted(["a", "b", "c"]) == {
        "acme": Wanted("admin", {"web": "maintainer"}),
        "globex": Wanted("member", {}),
    }
    assert groups.wanted(["a"]) == {"acme": Wanted("member", {"web": "viewer"})}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b"[[map]\n", r"not TOML"),
        (b"", r"one \[\[map\]\] table per mapping"),
        (
            b'[[map]]\ngroup = "g"\norg = "acme"\nrole = "owner"\nteams = "x"\n',
            r"\[\[map\]\] 1 \(group 'g'\): "
            r"unknown key 'teams'",
        ),
        (
            b'[[map]]\ngroup = "g"\norg = "acme"\nrole = "superuser"\n',
            r"role 'superuser' is not an organization "
            r"role \(owner, admin, member\)",
        ),
        (b'[[map]]\ngroup = "g"\norg = "acme"\nrole = "provisioner"\n', r"is not an organization role"),
        (b'[[map]]\ngroup = "g"\norg = "acme"\nteam = "web"\nrole = "admin"\n', r"not a team role \(maintainer"),
        (b'[[map]]\ngroup = ""\norg = "acme"\nrole = "owner"\n', r"group must be 1 to 255 printable"),
        (b'[[map]]\ngroup = "g"\norg = 7\nrole = "owner"\n', r"org must be"),
        (
            b'[[map]]\ngroup = "g"\norg = "acme"\nrole = "owner"\n'
            b'[[map]]\ngroup = "g"\norg = "acme"\nrole = "member"\n',
            r"\[\[map\]\] 2 \(group 'g'\): maps the same group to the same place as \[\[map\]\] 1",
        ),
        (b"\xff\xfe", r"not UTF-8"),
        (b"[settings]\nx = 1\n", r"one \[\[map\]\] table per mapping"),
    ],
    ids=[
        "not toml",
        "empty",
        "unknown key",
        "unknown role",
        "a token's role",
        "org role on a team",
        "empty group",
        "org not a string",
        "duplicate",
        "not utf-8",
        "other tables",
    ],
)
def test_a_group_map_mistake_is_refused_at_start_up_saying_where_and_what(
    tmp_path: Path, text: bytes, reason: str
) -> None:
    path = tmp_path / "groups.toml"
    path.write_bytes(text)
    with pytest.raises(SettingsError) as caught:
        load(PublisherSettings, build_parser().parse_args(["publisher", "--oidc-group-map", str(path)]), {})
    assert (caught.value.flag, caught.value.env) == ("--oidc-group-map", "KEYRELAY_OIDC_GROUP_MAP")
    assert re.search(reason, str(caught.value)), str(caught.value)


def test_a_missing_group_map_file_is_refused_by_its_variable_too(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"KEYRELAY_OIDC_GROUP_MAP.*cannot read it"):
        load(
            PublisherSettings,
            build_parser().parse_args(["publisher"]),
            {"KEYRELAY_OIDC_GROUP_MAP": str(tmp_path / "absent.toml")},
        )


def test_the_sign_in_settings_are_read_from_flags_variables_and_the_secret_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text("s3cret\n")
    groups = tmp_path / "groups.toml"
    groups.write_bytes(_documented_map())
    args = build_parser().parse_args(
        [
            "publisher",
            "--public-url",
            "https://keys.example.com/",
            "--oidc-issuer",
            "https://idp.example.com/",
            "--oidc-client-id",
            "keyrelay",
            "--oidc-client-secret-file",
            str(secret),
            "--oidc-group-map",
            str(groups),
            "--oidc-scopes",
            "openid,email groups",
        ]
    )
    settings = load(PublisherSettings, args, {"KEYRELAY_SESSION_TTL": "8h"})
    assert settings.public_url == "https://keys.example.com"  # an origin: the trailing slash goes
    assert settings.oidc_issuer == "https://idp.example.com/"  # exactly as the provider's iss says
    assert (settings.oidc_client_secret, settings.oidc_scopes) == ("s3cret", ("openid", "email", "groups"))
    assert settings.session_ttl == 8 * 3600
    assert settings.oidc_group_map is not None
    assert len(settings.oidc_group_map.mappings) == 3
    assert PublisherSettings().session_ttl == 12 * 3600


@pytest.mark.parametrize(
    ("environ", "flag", "reason"),
    [
        ({"KEYRELAY_OIDC_ISSUER": "https://idp.example.com"}, "--oidc-client-id", "needs the client id"),
        (
            {"KEYRELAY_OIDC_ISSUER": "https://idp.example.com", "KEYRELAY_OIDC_CLIENT_ID": "k"},
            "--public-url",
            "the URL browsers reach",
        ),
        ({"KEYRELAY_OIDC_ISSUER": "http://idp.example.com"}, "--oidc-issuer", "must be https"),
        ({"KEYRELAY_PUBLIC_URL": "https://keys.example.com/keyrelay"}, "--public-url", "the origin only"),
        ({"KEYRELAY_PUBLIC_URL": "ftp://keys.example.com"}, "--public-url", "give an https:// URL"),
        ({"KEYRELAY_PUBLIC_URL": "https://u:p@keys.example.com"}, "--public-url", "without user"),
        ({"KEYRELAY_OIDC_SCOPES": "email profile"}, "--oidc-scopes", "openid among them"),
        ({"KEYRELAY_SESSION_TTL": "90d"}, "--session-ttl", "from 1m to 30d"),
        ({"KEYRELAY_SESSION_TTL": "10s"}, "--session-ttl", "from 1m to 30d"),
    ],
    ids=[
        "issuer without client",
        "issuer without public url",
        "http issuer",
        "public url with a path",
        "not http",
        "credentials in the url",
        "no openid scope",
        "session too long",
        "session too short",
    ],
)
def test_sign_in_settings_that_cannot_work_stop_the_start(environ: dict[str, str], flag: str, reason: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load(PublisherSettings, build_parser().parse_args(["publisher"]), environ)
    assert caught.value.flag == flag
    assert reason in str(caught.value)


def test_a_loopback_issuer_may_be_plain_http() -> None:
    settings = load(
        PublisherSettings,
        build_parser().parse_args(["publisher"]),
        {
            "KEYRELAY_OIDC_ISSUER": "http://127.0.0.1:9400",
            "KEYRELAY_OIDC_CLIENT_ID": "keyrelay",
            "KEYRELAY_PUBLIC_URL": "http://127.0.0.1:8080",
        },
    )
    assert settings.oidc_issuer == "http://127.0.0.1:9400"
