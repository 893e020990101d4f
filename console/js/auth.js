// Who is signed in. The credential (an API key, or an OIDC access token) lives in
// sessionStorage only: it dies with the tab, and sign-out removes it. Never localStorage.

const CREDENTIAL = "steward.credential";
const OIDC_PENDING = "steward.oidc";
const CALLBACK = "/console/";

function read(key) {
  try {
    return JSON.parse(window.sessionStorage.getItem(key) || "null");
  } catch {
    return null;
  }
}

/** The bearer token to send, or null when signed out or expired. */
export function credential() {
  const stored = read(CREDENTIAL);
  if (!stored?.token) return null;
  if (stored.expires_at && Date.now() > stored.expires_at) {
    expireSession("your sign-in expired");
    return null;
  }
  return stored.token;
}

export function credentialKind() {
  return read(CREDENTIAL)?.kind || null;
}

export function storeCredential(kind, token, expiresInSeconds = null) {
  const expires_at = expiresInSeconds ? Date.now() + expiresInSeconds * 1000 : null;
  window.sessionStorage.setItem(CREDENTIAL, JSON.stringify({ kind, token, expires_at }));
}

/** Forget everything this tab holds (credential, project choice, pending OIDC state). */
export function signOut() {
  window.sessionStorage.clear();
}

export function expireSession(reason) {
  if (!window.sessionStorage.getItem(CREDENTIAL)) return;
  signOut();
  window.dispatchEvent(new CustomEvent("steward:signed-out", { detail: reason }));
}

export function looksLikeApiKey(value) {
  return /^stw_[0-9A-Za-z]{8}_[0-9A-Za-z]{32}$/.test(value.trim());
}

// -- configuration -----------------------------------------------------------------------------

/** /console/config.json, or <meta name="steward-oidc-issuer"> and friends; {} when neither. */
export async function loadConfig() {
  let config = {};
  try {
    const response = await fetch("/console/config.json", { cache: "no-store", credentials: "omit" });
    if (response.ok) config = await response.json();
  } catch {
    config = {};
  }
  const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.getAttribute("content") || "";
  const issuer = config?.oidc?.issuer || meta("steward-oidc-issuer");
  const oidc = issuer
    ? {
        issuer: String(issuer),
        client_id: String(config?.oidc?.client_id || meta("steward-oidc-client-id") || "steward-console"),
        scope: String(config?.oidc?.scope || meta("steward-oidc-scope") || "openid profile"),
        audience: config?.oidc?.audience ? String(config.oidc.audience) : null,
        label: String(config?.oidc?.label || "Sign in with single sign-on"),
      }
    : null;
  return { ...config, oidc };
}

// -- OIDC authorization code + PKCE (RFC 7636, S256) -------------------------------------------

function b64url(bytes) {
  let text = "";
  for (const byte of new Uint8Array(bytes)) text += String.fromCharCode(byte);
  return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function randomToken(bytes = 32) {
  return b64url(window.crypto.getRandomValues(new Uint8Array(bytes)));
}

export async function pkceChallenge(verifier) {
  const digest = await window.crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  return b64url(digest);
}

const trimSlash = (value) => String(value).replace(/\/+$/, "");

async function discover(issuer) {
  const response = await fetch(`${trimSlash(issuer)}/.well-known/openid-configuration`, { credentials: "omit", cache: "no-store" });
  if (!response.ok) throw new Error(`the issuer's discovery document answered ${response.status}`);
  const doc = await response.json();
  // Mix-up defence: the document must be the configured issuer's own.
  if (trimSlash(doc.issuer) !== trimSlash(issuer)) throw new Error("the discovery document names another issuer");
  const methods = doc.code_challenge_methods_supported;
  if (Array.isArray(methods) && !methods.includes("S256")) throw new Error("the issuer does not support PKCE S256");
  if (!doc.authorization_endpoint || !doc.token_endpoint) throw new Error("the discovery document lacks endpoints");
  return doc;
}

function redirectUri() {
  return `${window.location.origin}${CALLBACK}`;
}

/** Leave for the issuer's login page; completeOidc() finishes when it sends the browser back. */
export async function startOidc(oidc) {
  if (!window.isSecureContext || !window.crypto?.subtle) {
    throw new Error("single sign-on needs HTTPS (or localhost): the browser withholds the crypto it needs");
  }
  const doc = await discover(oidc.issuer);
  const verifier = randomToken(48);
  const state = randomToken(24);
  const nonce = randomToken(24);
  window.sessionStorage.setItem(OIDC_PENDING, JSON.stringify({ state, verifier, nonce, issuer: oidc.issuer, at: Date.now(), hash: window.location.hash }));
  const url = new URL(doc.authorization_endpoint);
  const params = {
    response_type: "code",
    client_id: oidc.client_id,
    redirect_uri: redirectUri(),
    scope: oidc.scope,
    state,
    nonce,
    code_challenge: await pkceChallenge(verifier),
    code_challenge_method: "S256",
  };
  if (oidc.audience) params.audience = oidc.audience;
  for (const [key, value] of Object.entries(params)) url.searchParams.set(key, value);
  window.location.assign(url.href);
}

function claims(jwt) {
  try {
    const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), "=")));
  } catch {
    return null;
  }
}

/**
 * On the way back from the issuer (?code=…&state=… or ?error=…): check the state, exchange the
 * code with the PKCE verifier at the token endpoint, keep the access token. Returns false when
 * this page load is not a callback.
 */
export async function completeOidc(oidc) {
  const params = new URLSearchParams(window.location.search);
  if (!params.has("state") && !params.has("code") && !params.has("error")) return false;
  const pending = read(OIDC_PENDING);
  window.sessionStorage.removeItem(OIDC_PENDING); // one use, whatever happens next
  window.history.replaceState(null, "", `${CALLBACK}${pending?.hash || ""}`); // the code leaves the address bar
  if (params.has("error")) {
    throw new Error(`the issuer refused the sign-in: ${params.get("error_description") || params.get("error")}`);
  }
  if (!oidc) throw new Error("single sign-on is not configured");
  if (!pending || !params.get("state") || params.get("state") !== pending.state) {
    throw new Error("the sign-in response does not match a sign-in started here (state mismatch)");
  }
  if (params.has("iss") && trimSlash(params.get("iss")) !== trimSlash(pending.issuer)) {
    throw new Error("the sign-in response comes from another issuer");
  }
  const doc = await discover(pending.issuer);
  const response = await fetch(doc.token_endpoint, {
    method: "POST",
    credentials: "omit",
    headers: { "Content-Type": "application/x-www-form-urlencoded", Accept: "application/json" },
    body: new URLSearchParams({
      grant_type: "authorization_code",
      code: params.get("code") || "",
      redirect_uri: redirectUri(),
      client_id: oidc.client_id,
      code_verifier: pending.verifier,
    }),
  });
  const tokens = await response.json().catch(() => ({}));
  if (!response.ok || !tokens.access_token) {
    throw new Error(`the token exchange failed: ${tokens.error_description || tokens.error || response.status}`);
  }
  if (tokens.id_token) {
    const idClaims = claims(tokens.id_token);
    if (!idClaims || idClaims.nonce !== pending.nonce) throw new Error("the ID token's nonce does not match this sign-in");
  }
  storeCredential("oidc", tokens.access_token, Number(tokens.expires_in) || 300);
  return true;
}
