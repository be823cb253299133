//! Pagination of lists: `?limit=` (default 100, at most 1000) and an
//! `?after=` cursor (the last id of the page before; ids are ULIDs, so id
//! order is creation order). A page that is not the last sends
//! `Link: <…>; rel="next"`; the body stays a JSON array.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

use super::{ApiError, ApiResult};

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// `?limit=&after=`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// At most this many items (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only items after this id (the last id of the previous page).
    pub after: Option<String>,
}

/// The limit asked for, checked.
pub fn limit(limit: Option<u32>) -> ApiResult<usize> {
    let limit = limit.map_or(DEFAULT_LIMIT, |l| l as usize);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::Invalid(format!("`limit` must be between 1 and {MAX_LIMIT}, not {limit}")));
    }
    Ok(limit)
}

/// One page of a list, as a JSON array, with the `Link` to the next page
/// when there is more.
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

impl<T> Page<T> {
    /// A page from up to `limit + 1` items in list order: the extra one only
    /// says that there is more. `next` builds the next page's URL from the
    /// last item shown.
    pub fn from_extra(mut items: Vec<T>, limit: usize, next: impl FnOnce(&T) -> String) -> Page<T> {
        let more = items.len() > limit;
        items.truncate(limit);
        let next = if more { items.last().map(next) } else { None };
        Page { items, next }
    }
}

/// `path?name=value&…`, each value percent-encoded.
pub fn link(path: &str, params: &[(&str, &str)]) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in params {
        query.append_pair(name, value);
    }
    format!("{path}?{}", query.finish())
}

impl<T: Serialize> IntoResponse for Page<T> {
    fn into_response(self) -> Response {
        // Room for the usual record up front: axum's `Json` starts at 128
        // bytes, and doubling up to a 20-agent list (5.7 KB) copied the
        // body six times, a tenth of a `GET /agents` (BENCHMARKS.md).
        let mut body = Vec::with_capacity(2 + self.items.len() * 512);
        if let Err(err) = serde_json::to_writer(&mut body, &self.items) {
            return ApiError::Internal(format!("writing a list as JSON: {err}")).into_response();
        }
        let mut response = ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response();
        if let Some(next) = self.next
            && let Ok(value) = HeaderValue::from_str(&format!("<{next}>; rel=\"next\""))
        {
            response.headers_mut().insert(header::LINK, value);
        }
        response
    }
}
