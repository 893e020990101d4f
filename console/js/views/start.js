// The quick-start panel: from an empty system to a chat completion through an approved model,
// each step checked live against the APIs, with the exact OpenAI SDK snippet for this gateway.

import { api } from "../api.js";
import { announce, copyText, h, section } from "../dom.js";

async function probe(fn) {
  try {
    return await fn();
  } catch {
    return null;
  }
}

// The views a quick start explains, each shown only to who can open it (its navigation link).
const VIEWS = [
  ["catalog", "Catalog", "Approved models and MCP servers (the dropdown), with provenance, licence, serving hints and tools."],
  ["request", "New request", "Ask for access, an endpoint (with its cost & security plan) or a larger quota."],
  ["queue", "Approvals", "Platform admins: pending requests with SLA clocks, overdue first."],
  ["project", "Project", "What the project may use (entitlements) and who is in it."],
  ["mcp", "MCP servers", "The MCP servers you may use, with their URL and tools, and your tool calls."],
  ["endpoints", "Endpoints", "Inference endpoints and their status."],
  ["usage", "Usage", "Tokens, latency and quotas as charts."],
  ["keys", "API keys", "Create (shown once), rotate, revoke."],
  ["audit", "Audit trail", "Platform admins: every change, the hash-chain verification and the audit report."],
];

export function sdkSnippet(origin, model) {
  return [
    "import os",
    "from openai import OpenAI",
    "",
    "client = OpenAI(",
    `    base_url="${origin}/v1",  # the Steward gateway`,
    '    api_key=os.environ["STEWARD_API_KEY"],  # a project key with inference:invoke',
    ")",
    "reply = client.chat.completions.create(",
    `    model="${model}",`,
    '    messages=[{"role": "user", "content": "Hello from Steward"}],',
    ")",
    "print(reply.choices[0].message.content)",
  ].join("\n");
}

export async function render(main, ctx) {
  const p = ctx.project;
  const enc = encodeURIComponent;
  // Only what this role may ask: a developer's quick start makes no call it would be refused.
  const may = (action, project = p) => ctx.can(action, project);
  const ask = (allowed, fn) => (allowed ? probe(fn) : null);
  const weekAgo = new Date(Date.now() - 7 * 86400 * 1000).toISOString();
  const [anyVersion, approved, requests, entitlements, endpoints, members, models, usage] = await Promise.all([
    ask(may("catalog.read", null), () => api("catalog", "/v1/catalog", { query: { limit: 1 } })),
    ask(may("catalog.read", null), () => api("catalog", "/v1/catalog", { query: { status: "approved", limit: 50 } })),
    ask(p && may("request.read"), () => api("approval", `/v1/projects/${enc(p)}/requests`, { query: { kind: ["access", "endpoint"], limit: 5 } })),
    ask(p && may("entitlement.read"), () => api("authz", `/v1/projects/${enc(p)}/entitlements`)),
    ask(p && may("endpoint.read"), () => api("inference", `/v1/projects/${enc(p)}/endpoints`)),
    ask(p && may("member.read"), () => api("authz", `/v1/projects/${enc(p)}/members`)),
    // The model ids this credential may call, exactly as the gateway names them.
    ask(p && may("inference.invoke"), () => api("gateway", "/v1/models")),
    ask(p && may("usage.read"), () => api("metering", "/v1/usage", { query: { project: p, start: weekAgo } })),
  ]);
  const readyEndpoint = (Array.isArray(endpoints) ? endpoints : []).find((e) => e.status === "ready");
  const callable = (models?.data || []).map((m) => m.id);
  const model = callable[0] || readyEndpoint?.route_name || "<a model id from GET /v1/models>";
  const admin = ctx.isPlatformAdmin;
  const calls = (usage?.rows || []).reduce((n, r) => n + (Number(r.requests) || 0), 0);

  const steps = [
    { title: "Create a project", text: "Projects are the tenancy unit: members, keys, quotas and entitlements belong to one.", done: ctx.projects.length > 0, admin: true, link: ["projects", "Projects"] },
    { title: "Add a team member and issue their key", text: "Give a developer a role in the project, then create a key for them (shown once).", done: members ? members.length > 0 : Boolean(p), admin: true, link: ["project", "Project"], link2: ["keys", "API keys"] },
    { title: "Import the catalog", text: "Paste a Kubeflow catalog.yaml or MCP server.json: everything arrives as draft.", done: Boolean(anyVersion?.items?.length), admin: true, link: ["catalog", "Catalog", { import: "1" }] },
    { title: "Admit a model: request admission, then approve it", text: "A team asks for a draft version to be admitted; the platform admin reads its checklist and approves. Only approved versions reach the dropdown.", done: Boolean(approved?.items?.length), link: ["catalog", "Catalog", { status: "draft" }], link2: admin ? ["queue", "Approval queue"] : null },
    { title: "Request access or an endpoint", text: "From the dropdown: access to an approved model, or a new endpoint with its cost & security plan.", done: Boolean(requests?.items?.length || callable.length), link: ["request", "New request"] },
    { title: "Approve it", text: "The platform admin decides in the queue; Steward grants the entitlement or provisions the endpoint, no human step after that.", done: Boolean((entitlements || []).length || readyEndpoint || callable.length), admin: true, link: ["queue", "Approval queue"] },
    { title: "Call it with the OpenAI SDK", text: usage ? "Through the gateway, with a project key: every call is metered and counted against the project's quota." : "Through the gateway, with a project key (a key with usage:read shows here when the project's first call is counted).", done: calls > 0, link: ["usage", "Usage"] },
  ];
  const firstOpen = steps.findIndex((s) => !s.done);
  const list = h("ol", { class: "steps", id: "quickstart-steps" });
  steps.forEach((step, i) => {
    const state = step.done ? "done" : i === firstOpen ? "current" : "todo";
    const links = [step.link, step.link2].filter(Boolean).filter(([id]) => document.querySelector(`#nav a[href="#/${id}"]`));
    list.append(h("li", { class: state },
      h("span", { class: "mark", "aria-hidden": "true" }, step.done ? "✓" : String(i + 1)),
      h("div", {},
        h("strong", {}, step.title), step.admin && !admin ? h("span", { class: "hint" }, " (your platform admin does this)") : null,
        h("span", { class: "visually-hidden" }, step.done ? " — done" : state === "current" ? " — next" : ""),
        h("p", {}, step.text)),
      h("div", { class: "actions" }, links.map(([id, label, params]) => h("button", { type: "button", class: state === "current" ? "primary" : "secondary", onclick: () => ctx.go(id, params || {}) }, label)))));
  });

  const code = sdkSnippet(window.location.origin, model);
  const pre = h("pre", { id: "sdk-snippet", tabindex: "0", "aria-label": "Python snippet" }, code);
  const copy = h("button", { type: "button", class: "secondary", onclick: async () => {
    const ok = await copyText(code);
    announce(ok ? "Snippet copied" : "Copy failed: select the text and copy it by hand", ok ? "ok" : "error");
  } }, "Copy");
  const curl = `curl ${window.location.origin}/v1/chat/completions \\\n  -H "Authorization: Bearer $STEWARD_API_KEY" -H "Content-Type: application/json" \\\n  -d '{"model": "${model}", "messages": [{"role": "user", "content": "Hello"}]}'`;

  const empty = !ctx.projects.length || !anyVersion?.items?.length;
  main.append(
    h("div", { class: "view-head" }, h("div", {},
      h("h1", {}, empty ? "Welcome to Steward" : "Quick start"),
      h("p", { class: "lede" }, "Auth, catalog, approval — or nothing ships. Follow the steps from an empty system to a model call; each step turns green when Steward sees it done."))),
    section("From an empty system to a model call", list),
    section("Call a model",
      h("p", {}, "Install the SDK (pip install openai), export a project key as STEWARD_API_KEY, then:"),
      h("div", { class: "snippet" }, pre, copy),
      h("details", {}, h("summary", {}, "The same with curl"), h("pre", {}, curl)),
      h("p", { class: "help" }, "MCP clients connect to ", h("code", {}, `${window.location.origin}/mcp/<server>/`), " with the same key (scope mcp:invoke).")),
    section("What each view is for", h("dl", { class: "facts", id: "view-guide" },
      VIEWS.filter(([id]) => document.querySelector(`#nav a[href="#/${id}"]`))
        .flatMap(([, name, what]) => [h("dt", {}, name), h("dd", {}, what)]))),
  );
}
