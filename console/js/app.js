// The console's shell: sign-in, the header (project, identity, sign-out), the navigation
// (only what the signed-in principal may use) and a hash router over the view modules.

import { api } from "./api.js";
import { completeOidc, credential, credentialKind, loadConfig, looksLikeApiKey, signOut, startOidc, storeCredential } from "./auth.js";
import { announce, clear, field, h, input } from "./dom.js";
import { can, loadActions, roleIn } from "./roles.js";

const PROJECT = "steward.project";

// What the navigation offers; `visible` decides from whoami (roles and scopes), per project.
export const ROUTES = [
  { id: "start", label: "Quick start", load: () => import("./views/start.js"), visible: () => true },
  { id: "catalog", label: "Catalog", load: () => import("./views/catalog.js"), visible: (c) => c.can("catalog.read", null) },
  { id: "request", label: "New request", load: () => import("./views/request.js"), visible: (c) => c.project && c.can("request.write") },
  { id: "queue", label: "Approvals", load: () => import("./views/queue.js"), visible: (c) => c.can("request.review", null), admin: true },
  { id: "project", label: "Project", load: () => import("./views/project.js"), visible: (c) => c.project && c.can("project.read") },
  { id: "mcp", label: "MCP servers", load: () => import("./views/mcp.js"), visible: (c) => c.can("mcp.invoke", null) || c.can("catalog.read", null) },
  { id: "endpoints", label: "Endpoints", load: () => import("./views/endpoints.js"), visible: (c) => c.project && c.can("endpoint.read") },
  { id: "usage", label: "Usage", load: () => import("./views/usage.js"), visible: (c) => c.can("usage.read", null) },
  { id: "keys", label: "API keys", load: () => import("./views/keys.js"), visible: (c) => (c.project && c.can("key.read")) || c.can("platform_key.write", null) },
  { id: "audit", label: "Audit trail", load: () => import("./views/audit.js"), visible: (c) => c.can("audit.read", null), admin: true },
  { id: "projects", label: "Projects", load: () => import("./views/projects.js"), visible: (c) => c.can("project.create", null), admin: true },
];

const ctx = {
  principal: null,
  config: {},
  projects: [],
  project: null,
  /** May the principal do `action` in the current project (or in `project`; null = any)? */
  can(action, project = ctx.project) {
    return can(ctx.principal, action, project);
  },
  role(project = ctx.project) {
    return roleIn(ctx.principal, project);
  },
  get isPlatformAdmin() {
    return Boolean(ctx.principal?.platform_admin);
  },
  go(route, params = {}) {
    const query = new URLSearchParams(params).toString();
    window.location.hash = `#/${route}${query ? `?${query}` : ""}`;
  },
  async refreshProjects() {
    await loadProjects();
    renderShell();
  },
};

let cleanup = null;

function parseHash() {
  const raw = window.location.hash.replace(/^#\/?/, "");
  const [id, query = ""] = raw.split("?");
  return { id: id || "", params: Object.fromEntries(new URLSearchParams(query)) };
}

async function loadProjects() {
  let names = Object.keys(ctx.principal?.project_roles || {});
  if (can(ctx.principal, "project.read", null)) {
    try {
      const listed = await api("authz", "/v1/projects");
      names = listed.map((p) => p.name);
    } catch {
      /* keep the roles' projects */
    }
  }
  ctx.projects = [...new Set(names)].sort();
  const saved = window.sessionStorage.getItem(PROJECT);
  ctx.project = ctx.projects.includes(saved) ? saved : ctx.projects[0] || null;
}

function setProject(name) {
  ctx.project = name || null;
  if (name) window.sessionStorage.setItem(PROJECT, name);
  renderShell();
  route();
}

// -- sign-in -----------------------------------------------------------------------------------

function renderSignIn(message = "") {
  document.getElementById("shell-user").replaceChildren();
  document.getElementById("nav").replaceChildren();
  const main = clear(document.getElementById("main"));
  const keyInput = input({ type: "password", name: "api-key", autocomplete: "off", spellcheck: "false", required: true, placeholder: "stw_…" });
  const status = h("div", { class: "alert alert-error", role: "alert", hidden: !message, tabindex: "-1" }, message);
  const form = h(
    "form",
    { class: "signin", novalidate: true },
    field({ label: "API key", control: keyInput, name: "key", help: "A Steward key (stw_…). It stays in this browser tab only and is forgotten when you sign out or close the tab." }),
    h("button", { type: "submit", class: "primary" }, "Sign in"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = keyInput.value.trim();
    if (!looksLikeApiKey(key)) {
      status.hidden = false;
      status.textContent = "That does not look like a Steward API key (stw_ + 8 characters + _ + 32 characters).";
      keyInput.setAttribute("aria-invalid", "true");
      keyInput.focus();
      return;
    }
    storeCredential("api_key", key);
    await afterSignIn(status);
  });
  const oidc = ctx.config.oidc;
  const sso = oidc
    ? h("div", { class: "sso" }, h("p", {}, "or"), h("button", {
        type: "button",
        class: "secondary",
        onclick: async () => {
          try {
            await startOidc(oidc);
          } catch (error) {
            status.hidden = false;
            status.textContent = error.message;
          }
        },
      }, oidc.label))
    : null;
  main.append(
    h("div", { class: "signin-wrap" },
      h("h1", { tabindex: "-1" }, "Sign in to Steward"),
      h("p", { class: "lede" }, "The governance plane for your generative AI: a validated catalog, approvals, endpoints, usage and quotas."),
      status, form, sso,
      h("details", { class: "help-box" }, h("summary", {}, "Where do I get a key?"),
        h("p", {}, "The first start of Steward (make run) prints a platform-admin key once. Developers get a key from their project admin, or create one under API keys once signed in."))),
  );
  keyInput.focus();
}

async function afterSignIn(status) {
  try {
    ctx.principal = await api("authz", "/v1/whoami");
  } catch (error) {
    signOut();
    if (status) {
      status.hidden = false;
      status.textContent = error.status === 401 ? "Sign-in refused: the key is unknown, revoked or expired." : `Sign-in failed: ${error.detail || error.message}`;
      status.focus();
    } else {
      renderSignIn(`Sign-in failed: ${error.detail || error.message}`);
    }
    return;
  }
  await loadProjects();
  renderShell();
  announce(`Signed in as ${ctx.principal.subject}`);
  if (!parseHash().id) ctx.go("start");
  else route();
}

// -- shell -------------------------------------------------------------------------------------

function renderShell() {
  const user = document.getElementById("shell-user");
  const p = ctx.principal;
  const projectSelect = h("select", { id: "project-select" });
  if (!ctx.projects.length) projectSelect.append(h("option", { value: "" }, "no project yet"));
  for (const name of ctx.projects) projectSelect.append(h("option", { value: name }, name));
  projectSelect.value = ctx.project || "";
  projectSelect.addEventListener("change", () => setProject(projectSelect.value));
  const role = ctx.role();
  user.replaceChildren(
    h("div", { class: "project-picker" }, h("label", { for: "project-select" }, "Project"), projectSelect),
    h("div", { class: "who" },
      h("span", { class: "who-name", id: "who-name" }, p.subject),
      h("span", { class: "who-role" }, p.platform_admin ? "platform admin" : role || "no role here"),
      h("span", { class: "who-cred" }, credentialKind() === "oidc" ? "SSO" : `key ${p.credential_id}`)),
    h("button", { type: "button", class: "secondary", id: "sign-out", onclick: doSignOut }, "Sign out"),
  );
  const nav = document.getElementById("nav");
  const current = parseHash().id;
  const list = h("ul", {});
  for (const r of ROUTES.filter((r) => r.visible(ctx))) {
    // Following the link of the view already shown reloads it (no hashchange happens then).
    const reload = (event) => {
      if (parseHash().id === r.id && !event.ctrlKey && !event.metaKey) {
        event.preventDefault();
        window.history.replaceState(null, "", `#/${r.id}`);
        route();
      }
    };
    list.append(h("li", {}, h("a", { href: `#/${r.id}`, "aria-current": r.id === current ? "page" : null, class: r.admin ? "admin" : null, onclick: reload }, r.label)));
  }
  nav.replaceChildren(list);
}

function doSignOut() {
  const wasOidc = credentialKind() === "oidc";
  signOut();
  ctx.principal = null;
  window.location.hash = "";
  renderSignIn(wasOidc ? "Signed out of the console. Your single sign-on session at the issuer may still be open." : "Signed out. The key was removed from this tab.");
}

let navigations = 0;

async function route() {
  if (!ctx.principal) return;
  const { id, params } = parseHash();
  const visible = ROUTES.filter((r) => r.visible(ctx));
  const target = visible.find((r) => r.id === id) || visible[0];
  if (target.id !== id) {
    window.history.replaceState(null, "", `#/${target.id}`);
  }
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.getAttribute("href") === `#/${target.id}`) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (cleanup) cleanup();
  cleanup = null;
  // Each navigation renders into a container of its own: a view still loading when the user
  // moves on finishes into a detached element, never beside the next view.
  const turn = ++navigations;
  const main = h("div", { class: "view" });
  clear(document.getElementById("main")).append(main);
  document.title = `${target.label} · Steward`;
  try {
    const module = await target.load();
    const done = (await module.render(main, ctx, params)) || null;
    if (turn !== navigations) {
      if (done) done();
      return;
    }
    cleanup = done;
  } catch (error) {
    main.append(h("div", { class: "alert alert-error", role: "alert" }, `This view failed to load: ${error.message}`));
  }
  if (turn !== navigations) return;
  // Focus management: the view's heading, so keyboard and screen-reader users start there.
  const heading = main.querySelector("h1");
  if (heading) {
    heading.setAttribute("tabindex", "-1");
    if (!main.contains(document.activeElement) || document.activeElement === main) heading.focus();
  }
}

async function boot() {
  window.addEventListener("steward:signed-out", (event) => {
    ctx.principal = null;
    renderSignIn(`Signed out: ${event.detail || "the session ended"}.`);
  });
  window.addEventListener("hashchange", () => {
    if (ctx.principal) route();
  });
  [ctx.config] = await Promise.all([loadConfig(), loadActions()]);
  try {
    if (await completeOidc(ctx.config.oidc)) {
      await afterSignIn(null);
      return;
    }
  } catch (error) {
    renderSignIn(error.message);
    return;
  }
  if (credential()) await afterSignIn(null);
  else renderSignIn();
}

boot();
