// The request form: access to an approved asset, an inference endpoint with its cost & security
// plan (and the live estimate the reviewer will see), or a larger token quota. The server's
// field errors (422) are shown next to the fields they name. Below: the project's requests.

import { allPages, api } from "../api.js";
import { announce, badge, clearErrors, errorBox, field, fmtDuration, fmtMoney, fmtTime, h, input, loading, section, select, showErrors, table } from "../dom.js";
import { planCost } from "../cost.js";

export async function render(main, ctx, params) {
  const project = ctx.project;
  main.append(h("div", { class: "view-head" }, h("div", {},
    h("h1", {}, "New request"),
    h("p", { class: "lede" }, `For project ${project}. A platform admin reviews it (SLA: 5 days by default); some low-risk requests are approved at once by policy.`))));

  let approved = [];
  try {
    approved = await allPages("catalog", "/v1/catalog", { status: "approved" });
  } catch (error) {
    main.append(errorBox(error, "Catalog"));
  }

  const kind = params.kind && ["access", "endpoint", "quota"].includes(params.kind) ? params.kind : "access";
  const radios = h("div", { class: "radios", role: "radiogroup", "aria-labelledby": "kind-legend" });
  const panes = {};
  const form = h("form", { novalidate: true, id: "request-form" });
  const summary = h("div", { class: "alert alert-error", role: "alert", hidden: true, tabindex: "-1", id: "request-summary" });
  for (const [value, text] of [["access", "Access to an approved model or MCP server"], ["endpoint", "A new inference endpoint"], ["quota", "A larger token quota"]]) {
    const radio = h("input", { type: "radio", name: "kind", value, id: `kind-${value}`, checked: value === kind });
    radio.addEventListener("change", () => showPane(value));
    radios.append(h("label", { for: radio.id }, radio, text));
  }
  form.append(h("fieldset", {}, h("legend", { id: "kind-legend" }, "What do you need?"), radios));

  // -- access
  const asset = select([["", approved.length ? "Choose an approved asset" : "Nothing approved yet"], ...approved
    .filter((v, i, all) => all.findIndex((o) => o.kind === v.kind && o.name === v.name) === i)
    .map((v) => [`${v.kind}|${v.name}`, `${v.kind === "model" ? "Model" : "MCP server"} · ${v.name}`])], { id: "access-asset", value: params.asset || "" });
  // An MCP server may be asked for whole or for its read-only tools alone.
  const toolAccess = select([["", "every approved tool"], ["read_only", "read-only tools only"]], { id: "access-tools", value: params.tools || "" });
  const toolsField = field({ label: "Tools", control: toolAccess, name: "tool_access", help: "Tools that may change something (read_write, execute) stay out of a read-only grant." });
  const showTools = () => { toolsField.hidden = !asset.value.startsWith("mcp_server|"); };
  asset.addEventListener("change", showTools);
  showTools();
  panes.access = h("fieldset", {}, h("legend", {}, "Access"),
    field({ label: "Asset", control: asset, name: "asset_name", help: "Access covers every approved version of the asset." }),
    toolsField,
    field({ label: "Justification", control: h("textarea", { id: "access-justification", rows: 3, maxlength: 2000 }), name: "justification", hint: "(optional)" }));

  // -- endpoint
  const models = approved.filter((v) => v.kind === "model");
  const model = select([["", models.length ? "Choose an approved model" : "No approved model yet"], ...[...new Set(models.map((m) => m.name))].map((n) => [n, n])], { id: "endpoint-model", value: params.model || "" });
  const version = h("select", { id: "endpoint-version" });
  const fillVersions = () => {
    version.replaceChildren(...models.filter((m) => m.name === model.value).map((m) => h("option", { value: m.version }, m.version)));
    if (params.version && model.value === params.model) version.value = params.version;
  };
  model.addEventListener("change", fillVersions);
  fillVersions();
  const num = (id, attrs) => input({ type: "number", id, inputmode: "decimal", ...attrs });
  const gpus = num("plan-gpus", { min: 0, max: 64, step: 1, value: 1 });
  const replicas = num("plan-replicas", { min: 1, max: 64, step: 1, value: 1 });
  const hours = num("plan-hours", { min: 0.1, max: 8784, step: "any", value: 24 });
  const rate = num("plan-rate", { min: 0, max: 10000, step: "any", value: 2.5 });
  const currency = input({ id: "plan-currency", value: "USD", maxlength: 3, size: 4, pattern: "[A-Z]{3}" });
  const estimate = h("output", { id: "cost-estimate", for: "plan-gpus plan-replicas plan-hours plan-rate", "aria-live": "polite" });
  const formula = h("p", { class: "help", id: "cost-formula" });
  const updateEstimate = () => {
    const result = planCost({ gpus: gpus.value, replicas: replicas.value, hours: hours.value, gpu_hour_rate: rate.value });
    if (!result) {
      estimate.textContent = "—";
      formula.textContent = "Fill in GPUs, replicas, hours and the rate.";
      return;
    }
    estimate.textContent = fmtMoney(result.estimated_cost, /^[A-Z]{3}$/.test(currency.value) ? currency.value : "USD");
    formula.textContent = `${gpus.value} GPU × ${replicas.value} replica × ${hours.value} h = ${result.gpu_hours} GPU-hours × ${rate.value} per GPU-hour`;
  };
  for (const el of [gpus, replicas, hours, rate, currency]) el.addEventListener("input", updateEstimate);
  panes.endpoint = h("fieldset", {}, h("legend", {}, "Endpoint"),
    h("div", { class: "row" },
      field({ label: "Model", control: model, name: "model_name" }),
      field({ label: "Version", control: version, name: "version" }),
      field({ label: "Runtime", control: select([["local", "Local process"], ["kubernetes", "Kubernetes (KServe + vLLM)"], ["external", "External URL"]], { id: "endpoint-runtime", value: "local" }), name: "runtime" }),
      field({ label: "Context length", control: num("endpoint-context", { min: 1, step: 1 }), name: "context_length", hint: "(optional)" })),
    h("fieldset", {}, h("legend", {}, "Cost & security plan"),
      h("div", { class: "row" },
        field({ label: "GPUs per replica", control: gpus, name: "plan.gpus" }),
        field({ label: "GPU type", control: input({ id: "plan-gpu-type", value: "any", maxlength: 64 }), name: "plan.gpu_type" }),
        field({ label: "Replicas", control: replicas, name: "plan.replicas" }),
        field({ label: "Hours needed", control: hours, name: "plan.hours" })),
      h("div", { class: "row" },
        field({ label: "GPU-hour rate", control: rate, name: "plan.gpu_hour_rate", help: "Price of one GPU-hour" }),
        field({ label: "Currency", control: currency, name: "plan.currency" }),
        field({ label: "Data classification", control: select(["public", "internal", "confidential", "restricted"], { id: "plan-classification", value: "internal" }), name: "plan.data_classification", help: "The most sensitive data the endpoint will see" }),
        field({ label: "Network exposure", control: select([["project", "project only"], ["internal", "internal"], ["public", "public"]], { id: "plan-exposure" }), name: "plan.network_exposure" })),
      h("div", { class: "cost-box" }, h("span", {}, "Estimated cost (what the reviewer approves)"), estimate, formula)));

  // -- quota
  panes.quota = h("fieldset", {}, h("legend", {}, "Quota"),
    h("div", { class: "row" },
      field({ label: "Window", control: select(["minute", "hour", "day", "month"], { id: "quota-window", value: "day" }), name: "window" }),
      field({ label: "Token limit", control: num("quota-limit", { min: 1, step: 1 }), name: "token_limit", help: "Total tokens per window" }),
      field({ label: "Only for key id", control: input({ id: "quota-key", maxlength: 8, pattern: "[0-9A-Za-z]{8}" }), name: "key_id", hint: "(optional)" })),
    field({ label: "Justification", control: h("textarea", { id: "quota-justification", rows: 3, maxlength: 2000 }), name: "justification", hint: "(optional)" }));

  for (const pane of Object.values(panes)) form.append(pane);
  form.append(summary, h("div", { class: "actions" }, h("button", { type: "submit", class: "primary", id: "request-submit" }, "Submit request")));
  const outcome = h("div", { "aria-live": "polite", id: "request-outcome" });

  function showPane(value) {
    for (const [name, pane] of Object.entries(panes)) pane.hidden = name !== value;
    clearErrors(form);
    summary.hidden = true;
  }
  showPane(kind);
  updateEstimate();

  const value = (id) => form.querySelector(`#${id}`).value.trim();
  function payload(k) {
    if (k === "access") {
      const [assetKind, ...name] = asset.value.split("|");
      const body = { asset_kind: assetKind || "model", asset_name: name.join("|"), justification: value("access-justification") };
      if (assetKind === "mcp_server" && toolAccess.value) body.tool_access = [toolAccess.value];
      return body;
    }
    if (k === "endpoint") {
      const body = {
        model_name: model.value,
        version: version.value,
        runtime: value("endpoint-runtime"),
        plan: {
          gpus: numeric(gpus.value),
          gpu_type: value("plan-gpu-type") || "any",
          replicas: numeric(replicas.value),
          hours: numeric(hours.value),
          gpu_hour_rate: numeric(rate.value),
          currency: currency.value.trim(),
          data_classification: value("plan-classification"),
          network_exposure: value("plan-exposure"),
        },
      };
      if (value("endpoint-context")) body.context_length = numeric(value("endpoint-context"));
      return body;
    }
    const body = { window: value("quota-window"), token_limit: numeric(value("quota-limit")), justification: value("quota-justification") };
    if (value("quota-key")) body.key_id = value("quota-key");
    return body;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    summary.hidden = true;
    const k = form.querySelector("input[name=kind]:checked").value;
    const submit = form.querySelector("#request-submit");
    submit.disabled = true;
    try {
      const filed = await api("approval", `/v1/projects/${encodeURIComponent(project)}/requests`, { method: "POST", body: { kind: k, payload: payload(k) } });
      const text = filed.status === "approved" ? `Request approved at once by policy ${filed.policy || ""}.` : `Request filed: ${k}, due ${fmtTime(filed.due_at)}.`;
      outcome.replaceChildren(h("div", { class: "alert alert-ok", role: "status" }, text));
      announce(text, "ok");
      await list.refresh();
    } catch (error) {
      showErrors(form, error, summary);
    } finally {
      submit.disabled = false;
    }
  });

  main.append(section("Request", form, outcome));
  const list = projectRequests(ctx);
  main.append(list.element);
  await list.refresh();
}

function numeric(text) {
  const n = Number(text);
  return text === "" || Number.isNaN(n) ? text : n;
}

export function describe(r) {
  const p = r.payload || {};
  if (r.kind === "asset") return `admit ${p.asset_kind} ${p.asset_name} ${p.version}`;
  if (r.kind === "access") return `access to ${p.asset_kind === "mcp_server" ? "MCP server" : "model"} ${p.asset_name}`;
  if (r.kind === "endpoint") return `endpoint for ${p.model_name} ${p.version} (${p.runtime})`;
  if (r.kind === "quota") return `quota: ${Number(p.token_limit).toLocaleString()} tokens per ${p.window}${p.key_id ? ` for key ${p.key_id}` : ""}`;
  return r.kind;
}

function projectRequests(ctx) {
  const area = h("div", {}, loading());
  const element = section(`Requests of ${ctx.project}`, area);
  async function refresh() {
    try {
      const page = await api("approval", `/v1/projects/${encodeURIComponent(ctx.project)}/requests`, { query: { limit: 50 } });
      area.replaceChildren(table([
        ["Filed", (r) => fmtTime(r.created_at)],
        ["Kind", (r) => r.kind],
        ["What", (r) => describe(r)],
        ["By", (r) => r.requester],
        ["Status", (r) => h("span", {}, badge(r.status), r.overdue ? h("span", {}, " ", badge("overdue")) : null)],
        ["Decision", (r) => (r.decided_at ? `${r.decided_by}, ${fmtDuration(r.lead_time_seconds || 0)} after filing${r.decision_comment ? `: “${r.decision_comment}”` : ""}` : `due ${fmtTime(r.due_at)}`)],
        ["", (r) => (r.status === "pending" && (r.requester === ctx.principal.subject || ctx.role() === "project-admin")
          ? h("button", { type: "button", class: "secondary", onclick: async () => {
              try {
                await api("approval", `/v1/requests/${encodeURIComponent(r.id)}/withdraw`, { method: "POST", body: { comment: "" } });
                announce("Request withdrawn", "ok");
                await refresh();
              } catch (error) {
                announce(`Not withdrawn: ${error.detail}`, "error");
              }
            } }, "Withdraw")
          : "")],
      ], page.items, { empty: "No requests yet." }));
    } catch (error) {
      area.replaceChildren(errorBox(error, "Requests"));
    }
  }
  return { element, refresh };
}
