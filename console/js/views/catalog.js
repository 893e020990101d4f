// The catalog: the approved-only dropdown (what teams may use), every version with its
// provenance, licence, serving hints and MCP tools, and — for platform admins — imports and
// the deprecate/revoke actions.

import { allPages, api } from "../api.js";
import { announce, badge, clear, confirmDialog, errorBox, facts, field, fmtTime, h, isWebUrl, loading, section, select, showErrors, table } from "../dom.js";

const STATUSES = ["draft", "submitted", "approved", "deprecated", "revoked"];

export async function render(main, ctx, params) {
  const dropdown = h("select", { id: "approved-dropdown", name: "approved" });
  const details = h("div", { class: "details", id: "version-details", "aria-live": "polite" }, h("p", { class: "empty" }, "Pick a version to see its provenance, licence and serving hints."));
  const listArea = h("div", { class: "version-list" });
  const statusFilter = select([["", "every status"], ...STATUSES.map((s) => [s, s])], { id: "status-filter", value: params.status || "" });
  const kindFilter = select([["", "models and MCP servers"], ["model", "models"], ["mcp_server", "MCP servers"]], { id: "kind-filter" });
  const search = h("input", { type: "search", id: "catalog-search", placeholder: "name, provider, description" });

  main.append(
    h("div", { class: "view-head" }, h("div", {},
      h("h1", {}, "Catalog"),
      h("p", { class: "lede" }, "Only approved versions can be requested, deployed or called. Anything else is shown for review."))),
    section("Approved for use",
      h("p", { class: "help" }, "The dropdown teams choose from: approved models and MCP servers only."),
      field({ label: "Approved models and MCP servers", control: dropdown })),
  );

  if (ctx.can("catalog.write", null)) {
    const panel = importPanel(ctx, () => refresh());
    if (params.import) panel.open = true;
    main.append(panel);
  }

  const filters = h("form", { class: "row", role: "search", onsubmit: (e) => { e.preventDefault(); refresh(); } },
    field({ label: "Status", control: statusFilter }),
    field({ label: "Kind", control: kindFilter }),
    field({ label: "Search", control: search }),
    h("div", { class: "field" }, h("button", { type: "submit", class: "secondary" }, "Filter")));
  main.append(h("div", { class: "catalog-layout" }, section("All versions", filters, listArea), details));

  let versions = [];

  async function loadDropdown() {
    clear(dropdown).append(h("option", { value: "" }, "Loading…"));
    try {
      const approved = await allPages("catalog", "/v1/catalog", { status: "approved" });
      clear(dropdown).append(h("option", { value: "" }, approved.length ? `Choose one of ${approved.length} approved versions` : "Nothing approved yet"));
      for (const v of approved) dropdown.append(h("option", { value: v.id }, `${v.kind === "model" ? "Model" : "MCP server"} · ${v.name} ${v.version}`));
    } catch (error) {
      clear(dropdown).append(h("option", { value: "" }, "Could not load the catalog"));
      announce(`Catalog: ${error.detail}`, "error");
    }
  }

  async function refresh() {
    listArea.replaceChildren(loading());
    try {
      versions = await allPages("catalog", "/v1/catalog", { status: statusFilter.value || null, kind: kindFilter.value || null, q: search.value.trim() || null }, 600);
    } catch (error) {
      listArea.replaceChildren(errorBox(error, "Catalog"));
      return;
    }
    listArea.replaceChildren(table([
      ["Name", (v) => h("button", { type: "button", class: "link", onclick: () => showVersion(v.id) }, v.name)],
      ["Version", (v) => v.version],
      ["Kind", (v) => (v.kind === "model" ? "model" : "MCP server")],
      ["Status", (v) => badge(v.status)],
      ["Provider", (v) => v.provider || "—"],
    ], versions, { caption: `${versions.length} version${versions.length === 1 ? "" : "s"}`, empty: "No versions match. Import a catalog file to start." }));
    await loadDropdown();
  }

  async function showVersion(id) {
    if (!id) return;
    details.replaceChildren(loading());
    try {
      const version = await api("catalog", `/v1/versions/${encodeURIComponent(id)}`);
      details.replaceChildren(versionDetails(version, ctx, refresh));
      details.querySelector("h2")?.focus();
    } catch (error) {
      details.replaceChildren(errorBox(error, "Version"));
    }
  }

  dropdown.addEventListener("change", () => showVersion(dropdown.value));
  await refresh();
  if (params.version) await showVersion(params.version);
}

function licence(spec) {
  const name = spec.license || "";
  const link = spec.license_link || "";
  if (!name && !link) return null;
  if (link && isWebUrl(link)) return h("span", {}, name || "licence", " — ", h("a", { href: link, target: "_blank", rel: "noopener noreferrer" }, "licence text"));
  return name;
}

function servingHints(serving) {
  if (!serving || typeof serving !== "object") return null;
  return facts(Object.entries(serving).filter(([, v]) => v !== null && v !== "").map(([k, v]) => [k.replace(/_/g, " "), typeof v === "object" ? JSON.stringify(v) : String(v)]));
}

export function versionDetails(v, ctx, refresh) {
  const spec = v.spec || {};
  const headingId = `vd-${v.id}`;
  const box = h("section", { class: "panel", "aria-labelledby": headingId },
    h("h2", { id: headingId, tabindex: "-1" }, `${v.name} ${v.version}`, " ", badge(v.status)),
    v.description ? h("p", {}, v.description) : null,
    h("h3", {}, "Provenance"),
    facts([
      ["Kind", v.kind === "model" ? "model" : "MCP server"],
      ["Provider", v.provider],
      ["Source URI", spec.source_uri ? h("code", {}, spec.source_uri) : null],
      ["Artifacts", (spec.artifact_uris || []).filter((u) => u !== spec.source_uri)],
      ["Digest", spec.digest ? h("code", {}, spec.digest) : v.kind === "model" ? "not pinned by digest" : null],
      ["Licence", licence(spec)],
      ["Tasks", spec.tasks],
      ["Languages", spec.language],
      ["Tags", v.tags],
      ["Imported from", v.source],
      ["Status since", `${fmtTime(v.status_changed_at)}${v.status_reason ? ` — ${v.status_reason}` : ""}`],
    ]),
  );
  if (v.kind === "model") {
    const hints = servingHints(spec.serving);
    box.append(h("h3", {}, "Serving hints"), hints || h("p", { class: "empty" }, "None declared (runtime, GPUs and context length are chosen at request time)."));
  } else {
    box.append(
      h("h3", {}, "Tools"),
      table([
        ["Tool", (t) => h("code", {}, t.name)],
        ["Access", (t) => badge(t.access.replace("_", " "), t.access)],
        ["Description", (t) => (spec.tool_descriptions || {})[t.name] || ""],
      ], v.tools || [], { empty: "No tools declared." }),
      facts([
        ["Transports", spec.transports],
        ["Endpoints", Object.values(spec.endpoints || {}).map(String)],
        ["Packages", (spec.packages || []).map((p) => `${p.registry_type}:${p.identifier}@${p.version}`)],
      ]),
    );
  }
  if (v.checklist?.length) {
    box.append(h("h3", {}, "Validation checklist"), h("ul", { class: "checklist" }, v.checklist.map((c) => h("li", { class: c.ok ? "ok" : "fail" }, `${c.check}: ${c.detail}${c.ok ? "" : " (failed)"}`))));
  }
  box.append(versionActions(v, ctx, refresh));
  return box;
}

function versionActions(v, ctx, refresh) {
  const actions = h("div", { class: "actions" });
  const canRequest = ctx.project && ctx.can("request.write");
  if (v.status === "draft" && canRequest) {
    actions.append(h("button", {
      type: "button",
      class: "primary",
      onclick: async (event) => {
        event.target.disabled = true;
        try {
          const filed = await api("approval", `/v1/projects/${encodeURIComponent(ctx.project)}/requests`, {
            method: "POST",
            body: { kind: "asset", payload: { asset_kind: v.kind, asset_name: v.name, version: v.version } },
          });
          announce(`Admission of ${v.name} ${v.version} requested (${filed.status}); a platform admin reviews it.`, "ok");
          await refresh();
        } catch (error) {
          event.target.disabled = false;
          announce(`Not requested: ${error.detail}`, "error");
        }
      },
    }, "Request admission to the catalog"));
  }
  if (v.status === "approved" && canRequest) {
    actions.append(h("button", { type: "button", class: "primary", onclick: () => ctx.go("request", { kind: "access", asset: `${v.kind}|${v.name}` }) }, "Request access"));
    if (v.kind === "model") actions.append(h("button", { type: "button", class: "secondary", onclick: () => ctx.go("request", { kind: "endpoint", model: v.name, version: v.version }) }, "Request an endpoint"));
  }
  if (ctx.can("catalog.write", null) && ["approved", "deprecated"].includes(v.status)) {
    const change = async (verb) => {
      const answer = await confirmDialog({
        title: `${verb === "revoke" ? "Revoke" : "Deprecate"} ${v.name} ${v.version}?`,
        body: verb === "revoke" ? "Revoking cuts traffic at the gateway at once and takes the version out of the dropdown." : "Deprecated versions stay usable but are no longer offered.",
        confirm: verb === "revoke" ? "Revoke" : "Deprecate",
        danger: verb === "revoke",
        withReason: { label: "Reason (recorded in the audit trail)" },
      });
      if (!answer) return;
      try {
        await api("catalog", `/v1/versions/${encodeURIComponent(v.id)}/${verb}`, { method: "POST", body: { reason: answer.reason } });
        announce(`${v.name} ${v.version}: ${verb}d`, "ok");
        await refresh();
      } catch (error) {
        announce(`Not changed: ${error.detail}`, "error");
      }
    };
    if (v.status === "approved") actions.append(h("button", { type: "button", class: "secondary", onclick: () => change("deprecate") }, "Deprecate"));
    actions.append(h("button", { type: "button", class: "danger", onclick: () => change("revoke") }, "Revoke"));
  }
  return actions;
}

function importPanel(ctx, done) {
  const format = select([["catalog", "Catalog file (Kubeflow catalog.yaml)"], ["mcp", "MCP server.json (one document or an array)"]], { id: "import-format" });
  const text = h("textarea", { id: "import-text", rows: 8, spellcheck: "false", class: "mono" });
  const file = h("input", { type: "file", id: "import-file", accept: ".yaml,.yml,.json,application/json,application/yaml" });
  const dryRun = h("input", { type: "checkbox", id: "import-dry-run" });
  const summary = h("div", { class: "alert alert-error", role: "alert", hidden: true, tabindex: "-1" });
  const result = h("div", { "aria-live": "polite" });
  file.addEventListener("change", async () => {
    const chosen = file.files?.[0];
    if (chosen) {
      text.value = await chosen.text();
      if (chosen.name.endsWith(".json")) format.value = "mcp";
    }
  });
  const form = h("form", { novalidate: true },
    field({ label: "Format", control: format }),
    field({ label: "File", control: file, help: "Or paste the file below." }),
    field({ label: "Content", control: text, name: "body", help: "New versions arrive as draft; importing the same file again changes nothing; one bad entry refuses the whole file." }),
    h("div", { class: "checks" }, h("label", { for: dryRun.id }, dryRun, "Dry run: report what would change, write nothing")),
    summary,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Import")),
    result);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    summary.hidden = true;
    result.replaceChildren();
    if (!text.value.trim()) {
      showErrors(form, { title: "Nothing to import", errors: [{ field: "body", message: "Paste a file or choose one" }] }, summary);
      return;
    }
    const path = format.value === "mcp" ? "/v1/imports/mcp-servers" : "/v1/imports/catalog";
    try {
      const answer = await api("catalog", path, { method: "POST", body: text.value, contentType: format.value === "mcp" ? "application/json" : "application/yaml", query: { dry_run: dryRun.checked ? "true" : null } });
      const line = `${dryRun.checked ? "Dry run: would create" : "Imported: created"} ${answer.created}, updated ${answer.updated}, unchanged ${answer.unchanged}.`;
      result.replaceChildren(h("div", { class: "alert alert-ok", id: "import-result" }, line), table([
        ["Name", (r) => r.name], ["Version", (r) => r.version], ["Kind", (r) => r.kind], ["Outcome", (r) => r.outcome],
      ], answer.versions));
      announce(line, "ok");
      if (!dryRun.checked) await done();
    } catch (error) {
      const fields = error.errors.map((e) => ({ field: "", message: `${e.field ? `${e.field}: ` : ""}${e.message}` }));
      showErrors(form, { title: "Import refused, nothing imported", detail: error.detail, errors: fields }, summary);
    }
  });
  const panel = section("Import (platform admin)", form);
  return h("details", { class: "import-details" }, h("summary", {}, "Import a catalog file or MCP server.json"), panel);
}
