//! The audit trail: every change made through the API (tenants, keys,
//! provider credentials, agents, sessions, plugins, permission replies,
//! cancels) is recorded with who made it, when and from which address;
//! `GET /audit` shows it (the admin everything, a tenant its own).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use super::page::{self, Page, PageQuery};
use super::{ApiResult, AppState, QueryParams, new_id};
use crate::store::{AuditEntry, Recorded, auditing, now};
use crate::tenancy::Caller;

pub fn routes() -> Router<AppState> {
    Router::new().route("/audit", get(list))
}

/// Routes that change nothing the audit is about: a message starts a run
/// (kept as the run itself), not a change of the server's settings.
fn audited(method: &Method, route: &str) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
        && !route.ends_with("/message")
        && !route.ends_with("/message/stream")
}

/// Records each change answered with a success: in the transaction of the
/// change's first write when it has one (see [`auditing`]), else once it is
/// answered.
pub(super) async fn record(state: &AppState, caller: &Caller, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned());
    let Some(route) = route.filter(|r| audited(&method, r)) else { return next.run(req).await };
    let (actor, tenant_id) = match (caller, &state.tenancy) {
        (Caller::Tenant(id), _) => ("tenant", Some(id.clone())),
        (Caller::Operator, Some(_)) => ("admin", None),
        (Caller::Operator, None) => ("operator", None),
    };
    let entry = AuditEntry {
        id: new_id(),
        at: now(),
        actor: actor.into(),
        tenant_id,
        // What the change will most likely be answered with; corrected below
        // when it is not.
        status: if method == Method::POST { 201 } else { 200 },
        method: method.to_string(),
        route,
        path: req.uri().path().to_string(),
        address: req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip().to_canonical().to_string()),
    };
    let (response, recorded) = auditing(entry, next.run(req)).await;
    let status = response.status();
    let recording = match recorded {
        Some(Recorded::Written { id, .. }) if !status.is_success() => state.store.amend_audit(id, None).await,
        Some(Recorded::Written { id, status: expected }) if expected != status.as_u16() => {
            state.store.amend_audit(id, Some(status.as_u16())).await
        }
        Some(Recorded::Pending(mut entry)) if status.is_success() => {
            entry.status = status.as_u16();
            state.store.insert_audit(entry).await
        }
        _ => Ok(()),
    };
    if let Err(err) = recording {
        tracing::error!(%err, "cannot record a change in the audit trail");
    }
    response
}

#[utoipa::path(operation_id = "list_audit", get, path = "/audit", tag = "audit", params(PageQuery),
    responses((status = 200, body = Vec<AuditEntry>, description = "oldest first; the admin token (and a single-user server) sees every entry, a tenant key its own; `Link: <…>; rel=\"next\"` when there is more",
        headers(("Link" = String, description = "the next page, when there is one"))),
        (status = 422, body = super::ErrorBody)))]
pub(super) async fn list(State(state): State<AppState>, caller: Caller, QueryParams(q): QueryParams<PageQuery>) -> ApiResult<Page<AuditEntry>> {
    let limit = page::limit(q.limit)?;
    let rows = state.store.audit_page(caller.scope(), q.after, limit + 1).await?;
    Ok(Page::from_extra(rows, limit, |last: &AuditEntry| page::link("/audit", &[("limit", &limit.to_string()), ("after", &last.id)])))
}
