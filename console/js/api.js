// Calls to the control-plane APIs through the gateway (/api/{service}/…) with the signed-in
// credential. Errors are RFC 9457 problem+json; a 422 carries errors[] with field/message.

import { credential, expireSession } from "./auth.js";

export class ApiError extends Error {
  constructor(status, body, fallback) {
    const detail = body?.detail || body?.message || fallback || `HTTP ${status}`;
    super(detail);
    this.status = status;
    this.title = body?.title || "";
    this.detail = detail;
    this.errors = Array.isArray(body?.errors) ? body.errors : [];
    this.type = body?.type || "";
  }
}

function urlFor(service, path, query) {
  const url = new URL(service === "gateway" ? path : `/api/${service}${path}`, window.location.origin);
  for (const [key, value] of Object.entries(query || {})) {
    if (value === null || value === undefined || value === "") continue;
    for (const item of Array.isArray(value) ? value : [value]) url.searchParams.append(key, String(item));
  }
  return url;
}

/**
 * api("catalog", "/v1/catalog", {query: {status: "approved"}}) → parsed JSON (null for 204).
 * `body`: an object (sent as JSON) or a string with `contentType`. Service "gateway": the
 * gateway's own paths (e.g. "/mcp/", the MCP servers the caller may use).
 */
export async function api(service, path, { method = "GET", query, body, contentType, text = false } = {}) {
  const headers = { Accept: "application/json, application/problem+json" };
  const token = credential();
  if (token) headers.Authorization = `Bearer ${token}`;
  let payload;
  if (body !== undefined) {
    if (typeof body === "string") {
      payload = body;
      headers["Content-Type"] = contentType || "text/plain";
    } else {
      payload = JSON.stringify(body);
      headers["Content-Type"] = "application/json";
    }
  }
  let response;
  try {
    response = await fetch(urlFor(service, path, query), { method, headers, body: payload, credentials: "omit", cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, null, `cannot reach the gateway (${error.message})`);
  }
  if (response.status === 204) return null;
  const kind = response.headers.get("content-type") || "";
  let parsed = null;
  if (text && response.ok) return response.text();
  if (kind.includes("json")) {
    try {
      parsed = await response.json();
    } catch {
      parsed = null;
    }
  }
  if (!response.ok) {
    const error = new ApiError(response.status, parsed, response.status >= 502 ? `the ${service} service is not reachable` : response.statusText);
    error.service = service;
    if (response.status === 401 && path !== "/v1/whoami") expireSession(error.detail);
    throw error;
  }
  return parsed;
}

/** Every page of a cursor-paged list (items/next_cursor), up to `max` items. */
export async function allPages(service, path, query = {}, max = 1000) {
  const items = [];
  let cursor = null;
  do {
    const page = await api(service, path, { query: { ...query, cursor, limit: query.limit || 200 } });
    items.push(...(page?.items || []));
    cursor = page?.next_cursor || null;
  } while (cursor && items.length < max);
  return items;
}
