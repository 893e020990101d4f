// Usage dashboards from the metering API, as charts: tokens over time, by project and by
// model, time-to-first-token percentiles per model, and quota gauges with the soft threshold.

import { api } from "../api.js";
import { gauge, groupedColumns, horizontalBars, stackedColumns } from "../charts.js";
import { announce, errorBox, facts, field, fmtMoney, fmtNumber, h, input, loading, section, select, showErrors } from "../dom.js";

const RANGES = {
  hour: { label: "last hour, per minute", seconds: 3600, interval: "minute", step: 60 },
  day: { label: "last 24 hours, per hour", seconds: 86400, interval: "hour", step: 3600 },
  week: { label: "last 7 days, per day", seconds: 7 * 86400, interval: "day", step: 86400 },
  month: { label: "last 30 days, per day", seconds: 30 * 86400, interval: "day", step: 86400 },
};

function floorTo(date, step) {
  const ms = step * 1000;
  return new Date(Math.floor(date.getTime() / ms) * ms);
}

function pointLabel(date, interval) {
  if (interval === "minute" || interval === "hour") return date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
  return date.toLocaleDateString(undefined, { month: "short", day: "numeric" });
}

/** Series rows (intervals without usage are left out) → one point per interval, zeros filled. */
export function fillSeries(rows, start, end, range) {
  const byStart = new Map();
  for (const row of rows) {
    const key = floorTo(new Date(row.start), range.step).getTime();
    const prev = byStart.get(key) || [0, 0];
    byStart.set(key, [prev[0] + (row.prompt_tokens || 0), prev[1] + (row.completion_tokens || 0)]);
  }
  const points = [];
  for (let t = floorTo(start, range.step).getTime(); t < end.getTime(); t += range.step * 1000) {
    points.push({ label: pointLabel(new Date(t), range.interval), values: byStart.get(t) || [0, 0] });
  }
  return points;
}

export async function render(main, ctx, params) {
  const rangeSelect = select(Object.entries(RANGES).map(([k, r]) => [k, r.label]), { id: "usage-range", value: params.range || "day" });
  const scopeOptions = [["", ctx.isPlatformAdmin ? "all projects" : "all my projects"], ...ctx.projects.map((p) => [p, p])];
  const projectSelect = select(scopeOptions, { id: "usage-project", value: params.project || "" });
  const totals = h("div", { id: "usage-totals" });
  const charts = h("div", { class: "charts", id: "usage-charts" }, loading());
  const quotas = h("div", { class: "gauges", id: "quota-gauges" });
  const controls = h("form", { class: "row", onsubmit: (e) => { e.preventDefault(); load(); } },
    field({ label: "Range", control: rangeSelect }),
    field({ label: "Projects", control: projectSelect }),
    h("div", { class: "field" }, h("button", { type: "submit", class: "secondary" }, "Refresh")));
  rangeSelect.addEventListener("change", load);
  projectSelect.addEventListener("change", load);
  main.append(
    h("div", { class: "view-head" }, h("div", {},
      h("h1", {}, "Usage"),
      h("p", { class: "lede" }, "Every call through the gateway is metered: tokens, time to first token, duration. Quotas warn at the soft threshold and refuse calls (429) at the limit."))),
    controls, totals, charts, section("Quotas", h("p", { class: "help" }, "The black tick marks the soft threshold: past it a warning goes out (and the quota's webhook is called)."), quotas));
  if (ctx.can("quota.manage", null)) main.append(quotaForm(ctx, () => load()));

  async function load() {
    const range = RANGES[rangeSelect.value] || RANGES.day;
    const end = new Date();
    const start = new Date(end.getTime() - range.seconds * 1000);
    const project = projectSelect.value || null;
    const base = { start: start.toISOString(), end: end.toISOString(), project };
    charts.replaceChildren(loading());
    let series;
    let byProject;
    let byModel;
    try {
      [series, byProject, byModel] = await Promise.all([
        api("metering", "/v1/usage/series", { query: { ...base, interval: range.interval } }),
        api("metering", "/v1/usage", { query: { ...base, group_by: "project" } }),
        api("metering", "/v1/usage", { query: { ...base, group_by: "model" } }),
      ]);
    } catch (error) {
      charts.replaceChildren(errorBox(error, "Metering"));
      totals.replaceChildren();
      loadQuotas(project);
      return;
    }
    const rows = byProject.rows || [];
    const sum = (key) => rows.reduce((a, r) => a + (Number(r[key]) || 0), 0);
    totals.replaceChildren(h("div", { class: "panel" }, facts([
      ["Requests", fmtNumber(sum("requests"))],
      ["Errors", h("span", { id: "usage-errors" }, fmtNumber(sum("errors")),
        sum("errors") ? ` — ${fmtNumber(sum("rate_limited"))} refused for a quota or rate limit (429), ${fmtNumber(sum("server_errors"))} failed at the model or gateway (5xx), ${fmtNumber(sum("client_errors"))} bad requests (4xx)` : "")],
      ["Tokens (prompt + completion)", `${fmtNumber(sum("total_tokens"))} (${fmtNumber(sum("prompt_tokens"))} + ${fmtNumber(sum("completion_tokens"))})`],
      ["Cost", fmtMoney(sum("cost"), byProject.currency || "USD")],
    ])));
    const modelRows = byModel.rows || [];
    charts.replaceChildren(
      stackedColumns({ caption: `Tokens over time (${range.label})`, points: fillSeries(series.rows || [], start, end, range), series: ["prompt tokens", "completion tokens"] }),
      horizontalBars({ caption: "Tokens by project", items: rows.map((r) => ({ label: r.project || "?", value: r.total_tokens || 0 })) }),
      horizontalBars({ caption: "Tokens by model", items: modelRows.map((r) => ({ label: r.model || "?", value: r.total_tokens || 0 })) }),
      groupedColumns({ caption: "Time to first token by model (percentiles)", series: ["p50", "p95"], groups: modelRows.filter((r) => r.ttft_ms?.count).map((r) => ({ label: r.model || "?", values: [r.ttft_ms.p50, r.ttft_ms.p95] })) }),
    );
    loadQuotas(project);
  }

  async function loadQuotas(project) {
    try {
      const list = await api("metering", "/v1/quotas", { query: { project } });
      if (!list.length) {
        quotas.replaceChildren(h("p", { class: "empty" }, "No quotas set."));
        return;
      }
      // Names over ids: the keys of the projects whose keys this role may read.
      const keyNames = new Map();
      const projects = [...new Set(list.filter((q) => q.key_id).map((q) => q.project))];
      await Promise.all(projects.filter((p) => ctx.can("key.read", p)).map(async (p) => {
        try {
          for (const k of await api("authz", `/v1/projects/${encodeURIComponent(p)}/keys`)) keyNames.set(k.id, k.name);
        } catch {
          /* ids stay */
        }
      }));
      const keyLabel = (id) => (keyNames.has(id) ? `key ${keyNames.get(id)} (${id})` : `key ${id}`);
      quotas.replaceChildren(...list.flatMap((q) => {
        const limits = q.limits || {};
        const parts = [
          ["total", limits.total_tokens, (q.input_used || 0) + (q.output_used || 0)],
          ["input", limits.input_tokens, q.input_used || 0],
          ["output", limits.output_tokens, q.output_used || 0],
          ["calls", limits.requests, q.requests_used || 0],
        ].filter(([, limit]) => limit);
        return parts.map(([dim, limit, used]) => gauge({
          caption: `${q.project}${q.key_id ? ` · ${keyLabel(q.key_id)}` : ""}${q.model ? ` · ${q.model}` : ""} — ${dim === "calls" ? "calls" : `${dim} tokens`} per ${q.window}`,
          used, limit, soft: q.soft_threshold ?? 0.8, status: q.status || "ok",
        }));
      }));
    } catch (error) {
      quotas.replaceChildren(errorBox(error, "Quotas"));
    }
  }

  await load();
}

function quotaForm(ctx, done) {
  const project = select(ctx.projects.map((p) => [p, p]), { id: "quota-project", value: ctx.project || "" });
  const windowSel = select(["minute", "hour", "day", "month"], { id: "quota-window-admin", value: "day" });
  const limit = input({ type: "number", id: "quota-total", min: 1, step: 1 });
  const soft = input({ type: "number", id: "quota-soft", min: 0.05, max: 0.99, step: 0.05, value: 0.8 });
  const summary = h("div", { class: "alert alert-error", role: "alert", hidden: true, tabindex: "-1" });
  const form = h("form", { novalidate: true },
    h("div", { class: "row" },
      field({ label: "Project", control: project }),
      field({ label: "Window", control: windowSel, name: "window" }),
      field({ label: "Total tokens per window", control: limit, name: "limits.total_tokens" }),
      field({ label: "Soft threshold", control: soft, name: "soft_threshold", help: "Fraction of the limit where warnings start" })),
    summary, h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Set quota")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("metering", `/v1/projects/${encodeURIComponent(project.value)}/quotas`, {
        method: "POST",
        body: { window: windowSel.value, limits: { total_tokens: Number(limit.value) || limit.value }, soft_threshold: Number(soft.value) },
      });
      announce(`Quota set for ${project.value}`, "ok");
      await done();
    } catch (error) {
      showErrors(form, error, summary);
    }
  });
  return section("Set a quota (platform admin)", form);
}
