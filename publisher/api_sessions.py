"""The admin API's browser-session routes: list the sessions the caller may see (a user's own; an org owner's
members'; every one for the platform roles) and revoke one (its cookie stops at once)."""

from __future__ import annotations

from aiohttp import web

from . import api_schemas as s
from . import policy
from . import validation as v
from .access import SERVICES, actor_of
from .errors import Forbidden, NotFound
from .openapi import PAGE, Param, Route
from .pagination import Order, page_request
from .web_sessions import SessionStore, WebSession

__all__ = ["SESSION_ROUTES"]

SESSIONS = Order("sessions", ("id",))


async def list_sessions(request: web.Request) -> web.Response:
    """GET /v1/sessions?user_id=&limit=&cursor=: unexpired browser sessions the caller may see, oldest first."""
    actor = actor_of(request)
    page = page_request(request.query, SESSIONS)
    user_id = v.query_id(request.query["user_id"], "user_id") if request.query.get("user_id") else None
    sessions = await SessionStore(request.app[SERVICES].people.db).page(
        policy.reach(actor, "session.read"),
        actor.user_id,
        user_id=user_id,
        limit=page.fetch,
        after=None if page.after is None else str(page.after[0]),
    )
    return web.json_response(
        page.answer("sessions", sessions, lambda x: (x.id,), lambda x: x.to_json(current=x.id == actor.token_id))
    )


async def revoke_session(request: web.Request) -> web.Response:
    """DELETE /v1/sessions/{session_id}: the session ends now (its user's own, an owner of one of the user's
    organizations, or a platform admin)."""
    services = request.app[SERVICES]
    actor = actor_of(request)
    sessions = SessionStore(services.people.db)
    session = await sessions.get(v.path_id(request.match_info["session_id"], "session"))
    targets = [policy.Target(creator_user=session.user_id)]
    targets += [
        policy.Target(org_id=o, creator_user=session.user_id) for o in await services.people.user_orgs(session.user_id)
    ]
    if not any(policy.allowed(actor, "session.read", t) for t in targets):
        raise NotFound("session", session.id)
    if not any(policy.allowed(actor, "session.revoke", t) for t in targets):
        refused = {"action": "session.revoke", "target": session.id}
        await services.store.record(actor, "access.refused", (None, None, None, None, refused))
        raise Forbidden(
            "only the session's user, an owner of one of its organizations or a platform admin may "
            "revoke it; docs/permissions.md lists who may"
        )
    await sessions.end(actor, session, "session.revoke")
    return web.json_response({**WebSession.to_json(session, current=session.id == actor.token_id), "revoked": True})


SESSION_ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/sessions",
        list_sessions,
        "List the browser sessions the caller may see",
        {200: s.SESSION_PAGE},
        query=(Param("user_id", s.ID, "only this user's sessions"), *PAGE),
        errors=(400,),
        tags=("people",),
    ),
    Route(
        "DELETE",
        "/v1/sessions/{session_id}",
        revoke_session,
        "Revoke a browser session: its cookie stops at once",
        {200: s.REVOKED_SESSION},
        errors=(404,),
        tags=("people",),
    ),
)
