// The API client: the token (or tenant key) lives in sessionStorage, so it
// is gone when the tab closes and never reaches another tab or a cookie.
// Every error is thrown with the API's own `error` text.

const TOKEN_KEY = "hangar.token";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const auth = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  },
  onUnauthorized: () => {},
};

export function headers(extra = {}) {
  const out = { ...extra };
  if (auth.token) out.Authorization = `Bearer ${auth.token}`;
  return out;
}

async function failure(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  let code;
  try {
    const body = await resp.json();
    if (body && typeof body.error === "string") {
      message = body.error;
      code = body.code;
    }
  } catch {
    // Not JSON: the status line says it.
  }
  if (resp.status === 401) auth.onUnauthorized(message);
  return new ApiError(resp.status, message, code);
}

/** `method path` with an optional JSON body; resolves to the parsed answer. */
export async function api(method, path, body, { signal, extraHeaders } = {}) {
  const init = { method, headers: headers(extraHeaders), signal, cache: "no-store" };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await failure(resp);
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

/** A streaming GET (SSE): the raw response, checked. */
export async function stream(path, { signal, lastEventId } = {}) {
  const extra = { Accept: "text/event-stream" };
  if (lastEventId) extra["Last-Event-ID"] = String(lastEventId);
  const resp = await fetch(path, { headers: headers(extra), signal, cache: "no-store" });
  if (!resp.ok) throw await failure(resp);
  return resp;
}

/** Whether `path` answers 200 (false on 404), for optional features. */
export async function probe(path) {
  try {
    return await api("GET", path);
  } catch (err) {
    if (err instanceof ApiError && (err.status === 404 || err.status === 405)) return null;
    throw err;
  }
}

/** Every item of a paged list, following `Link: <…>; rel="next"` (at most `pages` pages). */
export async function list(path, pages = 20) {
  const out = [];
  let next = path;
  while (next && pages-- > 0) {
    const resp = await fetch(next, { headers: headers(), cache: "no-store" });
    if (!resp.ok) throw await failure(resp);
    out.push(...(await resp.json()));
    const link = resp.headers.get("Link") || "";
    const m = link.match(/<([^>]+)>\s*;\s*rel="next"/);
    next = m && m[1].startsWith("/") ? m[1] : null;
  }
  return out;
}
