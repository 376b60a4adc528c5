// common.js: helpers shared by the chat page and the release console.
// Builds DOM without innerHTML (all text goes through text nodes), wraps fetch so every call is
// same-origin with the session cookie and the CSRF header, and turns HTTP failures into
// messages a person can read. Keys are only ever sent in a POST body, never stored.

/** Raised for a non-2xx answer; `message` is the server's error.message (or a fallback). */
export class ApiError extends Error {
  constructor(status, message, { type = null, code = null, retryAfter = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.type = type;
    this.code = code;
    this.retryAfter = retryAfter; // seconds, or null
  }
}

/** Raised when the request never got an answer (offline, server down, connection reset). */
export class NetworkError extends Error {
  constructor() {
    super("Could not reach the service. Check your connection and try again.");
    this.name = "NetworkError";
  }
}

// ------------------------------------------------------------------------------------ DOM

/**
 * A new element. `props`: "class", "text" (textContent), anything else becomes an attribute
 * (true: present and empty; null/undefined/false: left out). Children: nodes or strings (as text).
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  setProps(node, props);
  append(node, ...children);
  return node;
}

/** The same as `el` for SVG elements (the console's loss chart). */
export function svgEl(tag, props = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setProps(node, props);
  append(node, ...children);
  return node;
}

function setProps(node, props) {
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "style" || name.toLowerCase().startsWith("on")) {
      throw new Error(`el(): refusing attribute ${name} (the CSP forbids inline styles and handlers)`);
    }
    if (name === "text") node.textContent = String(value);
    else if (name === "class") node.setAttribute("class", String(value));
    else node.setAttribute(name, value === true ? "" : String(value));
  }
}

/** Append nodes or strings (strings become text nodes, never markup). */
export function append(parent, ...children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : String(child));
  }
}

/** Remove every child of `node`. */
export function clear(node) {
  node.replaceChildren();
}

/** Set the text of a message element (an empty string hides it through CSS :empty). */
export function setText(node, text) {
  node.textContent = text || "";
}

/** Show exactly one of `views` (elements), hide the others. */
export function showOnly(views, visible) {
  for (const view of views) view.hidden = view !== visible;
}

/** A number for display: fixed digits, or an em dash when missing. */
export function fmtNumber(value, digits = 1) {
  return Number.isFinite(value) ? value.toFixed(digits) : "—";
}

/** A signed number: "+4.1", "-0.3". */
export function fmtSigned(value, digits = 1) {
  if (!Number.isFinite(value)) return "—";
  return (value > 0 ? "+" : "") + value.toFixed(digits);
}

// ---------------------------------------------------------------------------------- fetch

/**
 * fetch() with the session cookie and, when given, the CSRF token. `body` is sent as JSON.
 * Resolves to the Response when it is 2xx; throws ApiError (an HTTP error), NetworkError, or
 * the AbortError of `signal`.
 */
export async function apiFetch(path, { method = "GET", body, csrf, signal, accept = "application/json" } = {}) {
  const headers = { Accept: accept };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (csrf) headers["X-CSRF-Token"] = csrf;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
      cache: "no-store",
      signal,
    });
  } catch (e) {
    if (isAbort(e)) throw e;
    throw new NetworkError();
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

/** apiFetch, then the JSON body (null for 204 No Content). */
export async function apiJson(path, options) {
  const response = await apiFetch(path, options);
  if (response.status === 204) return null;
  try {
    return await response.json();
  } catch {
    throw new ApiError(response.status, "The service sent an answer this page cannot read.");
  }
}

/** True for the error an aborted fetch or stream read rejects with. */
export function isAbort(e) {
  return Boolean(e) && e.name === "AbortError";
}

/** An ApiError from an error response: its {"error": {"message", ...}} body when it has one. */
export async function errorFrom(response) {
  let detail = null;
  try {
    const body = await response.json();
    detail = body && typeof body.error === "object" ? body.error : null;
  } catch {
    // not JSON (a proxy's HTML page, an empty body): fall back to the status
  }
  const message = detail && typeof detail.message === "string" && detail.message
    ? detail.message
    : fallbackMessage(response.status, response.statusText);
  return new ApiError(response.status, message, {
    type: detail ? detail.type : null,
    code: detail ? detail.code : null,
    retryAfter: retryAfterSeconds(response.headers.get("Retry-After")),
  });
}

/** An ApiError for an {"error": {...}} chunk that arrived inside a stream. */
export function streamError(detail) {
  const message = detail && typeof detail.message === "string" && detail.message
    ? detail.message
    : "The service failed while answering.";
  return new ApiError(0, message, { type: detail && detail.type, code: detail && detail.code });
}

function fallbackMessage(status, statusText) {
  const known = {
    400: "The request was not accepted.",
    401: "Your key is not valid or your session expired.",
    403: "This key is not allowed to do that.",
    404: "Not found.",
    409: "That change is not allowed in the current state.",
    413: "The message is too long.",
    500: "The service had an internal error.",
  };
  return known[status] || `The service answered ${status}${statusText ? ` ${statusText}` : ""}.`;
}

/** Retry-After as whole seconds (it may be a number of seconds or an HTTP date), or null. */
export function retryAfterSeconds(header) {
  if (!header) return null;
  const text = header.trim();
  if (/^\d+$/.test(text)) return Number(text);
  const when = Date.parse(text);
  if (Number.isNaN(when)) return null;
  return Math.max(0, Math.ceil((when - Date.now()) / 1000));
}

/** "The service is busy — try again in N seconds" (or "in a moment" without Retry-After). */
export function busyMessage(seconds) {
  if (!Number.isFinite(seconds)) return "The service is busy — try again in a moment.";
  const n = Math.max(1, Math.round(seconds));
  return `The service is busy — try again in ${n} second${n === 1 ? "" : "s"}.`;
}

/** A human message for any error these helpers throw (pages special-case 401 themselves). */
export function describeError(e) {
  if (e instanceof NetworkError) return e.message;
  if (e instanceof ApiError) {
    if (e.status === 429 || e.status === 503) return busyMessage(e.retryAfter);
    if (e.status === 504) return "The request timed out — try again, perhaps with a shorter question.";
    return e.message;
  }
  return "Something went wrong in this page. Reload it and try again.";
}

// ------------------------------------------------------------------------------- sessions

/** This browser's session of `kind` ("department" | "admin"), or null when there is none. */
export async function getSession(kind) {
  try {
    return await apiJson(`/ui/session?kind=${encodeURIComponent(kind)}`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return null;
    throw e;
  }
}

/** Exchange a key for a session cookie; resolves to the session ({kind, csrf, ...}). */
export function openSession(kind, key) {
  return apiJson("/ui/session", { method: "POST", body: { key, kind } });
}

/** Log out (an already expired session counts as logged out). */
export async function closeSession(kind, csrf) {
  try {
    await apiFetch(`/ui/session?kind=${encodeURIComponent(kind)}`, { method: "DELETE", csrf });
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) throw e;
  }
}

// The key form of both pages: validate, exchange the key for a session, report what went wrong.
// `form` holds the input, submit button and error elements; `onSession(session)` enters the page.
export async function submitKey(event, kind, form, emptyMessage, onSession) {
  event.preventDefault();
  const key = form.input.value.trim();
  if (!key) {
    setText(form.error, emptyMessage);
    form.input.focus();
    return;
  }
  setText(form.error, "");
  form.submit.disabled = true;
  try {
    const session = await openSession(kind, key);
    form.input.value = "";
    onSession(session);
  } catch (e) {
    setText(form.error, describeError(e));
    form.input.select();
  } finally {
    form.submit.disabled = false;
  }
}

