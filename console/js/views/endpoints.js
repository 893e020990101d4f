// Inference endpoints of the project, with their status (provisioning → ready | failed →
// deleting), what clients send as `model` at the gateway, and delete for project admins; then
// each endpoint's GPU-hours and cost so far against the plan its reviewer approved (metering).
// Tolerant of fields it does not know: the inference API may grow.

import { api } from "../api.js";
import { announce, badge, confirmDialog, errorBox, fmtDuration, fmtMoney, fmtNumber, fmtTime, h, loading, section, table } from "../dom.js";

const MOVING = new Set(["provisioning", "deleting"]);

export async function render(main, ctx) {
  const project = ctx.project;
  const area = h("div", { id: "endpoint-list" }, loading());
  const pool = h("div", {});
  const costs = h("div", { id: "endpoint-costs" });
  main.append(
    h("div", { class: "view-head" }, h("div", {},
      h("h1", {}, "Endpoints"),
      h("p", { class: "lede" }, `Inference endpoints of ${project}. An approved endpoint request provisions one with no human step; the gateway routes to it once it is ready.`)),
      ctx.can("request.write") ? h("button", { type: "button", class: "primary", onclick: () => ctx.go("request", { kind: "endpoint" }) }, "Request an endpoint") : null),
    section("Endpoints", area),
    ctx.can("usage.read") ? section("Cost against the approved plan", h("p", { class: "help" }, "GPU-hours count while an endpoint holds its GPUs (provisioning, ready, deleting), priced at the model's GPU-hour price, or at the plan's rate when there is none. An endpoint is over its plan once its cost passes the estimate the reviewer approved, or its GPU-hours the planned ones."), costs) : null,
    section("GPU pool", pool));

  let timer = null;
  async function load() {
    let rows;
    try {
      rows = await api("inference", `/v1/projects/${encodeURIComponent(project)}/endpoints`);
    } catch (error) {
      area.replaceChildren(errorBox(error, "Inference service"));
      return;
    }
    rows = Array.isArray(rows) ? rows : rows?.items || [];
    const manage = ctx.can("endpoint.manage");
    area.replaceChildren(table([
      ["Model", (e) => `${e.model_name ?? "?"} ${e.version ?? ""}`],
      ["Call it as", (e) => (e.route_name ? h("code", {}, e.route_name) : "—")],
      ["Runtime", (e) => [e.runtime, e.profile].filter(Boolean).join(" · ")],
      ["Size", (e) => `${e.replicas ?? "?"} × ${e.gpus ?? 0} GPU${e.gpu_type && e.gpu_type !== "any" ? ` (${e.gpu_type})` : ""}`],
      ["Status", (e) => h("span", { class: "endpoint-status", "data-status": e.status }, badge(e.status || "unknown"), e.reason ? h("span", { class: "help" }, ` ${e.reason}`) : null)],
      ["Ready", (e) => (e.ready_at ? `${fmtTime(e.ready_at)}${e.lead_time_seconds != null ? ` (${fmtDuration(e.lead_time_seconds)} after the request)` : ""}` : "—")],
      ["Exposure", (e) => e.network_exposure],
      ["", (e) => (manage && !["deleting", "deleted"].includes(e.status)
        ? h("button", { type: "button", class: "danger", "aria-label": `Delete endpoint ${e.route_name || e.id}`, onclick: async () => {
            const ok = await confirmDialog({ title: `Delete ${e.route_name || e.model_name}?`, body: "The gateway route goes at once; the runtime and its GPUs are released.", confirm: "Delete", danger: true });
            if (!ok) return;
            try {
              await api("inference", `/v1/projects/${encodeURIComponent(project)}/endpoints/${encodeURIComponent(e.id)}`, { method: "DELETE" });
              announce(`Endpoint ${e.route_name || e.id} is being deleted`, "ok");
              await load();
            } catch (error) {
              announce(`Not deleted: ${error.detail}`, "error");
            }
          } }, "Delete")
        : "")],
    ], rows, { empty: "No endpoints yet. Request one from an approved model." }));
    // Fast while one is changing; slower otherwise, so an endpoint whose approval is still on
    // its way (provisioning starts from an event) appears without a reload.
    window.clearTimeout(timer);
    timer = window.setTimeout(load, rows.some((e) => MOVING.has(e.status)) ? 2000 : 5000);
  }

  async function loadPool() {
    try {
      const p = await api("inference", "/v1/gpu-pool");
      pool.replaceChildren(table([
        ["GPU type", ([t]) => t],
        ["Total", ([, v]) => v.total],
        ["Used", ([, v]) => v.used],
        ["Free", ([, v]) => v.free],
        ["This project holds", ([t]) => (p.projects?.[project]?.[t] ?? 0)],
      ], Object.entries(p.types || {}), { empty: "No GPU pool configured." }));
    } catch (error) {
      pool.replaceChildren(errorBox(error, "GPU pool"));
    }
  }

  async function loadCosts() {
    if (!ctx.can("usage.read")) return;
    try {
      const report = await api("metering", `/v1/usage/endpoints?project=${encodeURIComponent(project)}`);
      const money = (v) => fmtMoney(v, report.currency);
      costs.replaceChildren(table([
        ["Model", (e) => h("code", {}, e.model)],
        ["Status", (e) => badge(e.status || "unknown")],
        ["GPUs held", (e) => e.gpus_held],
        ["GPU-hours", (e) => `${fmtNumber(e.gpu_hours, 2)}${e.plan ? ` of ${fmtNumber(e.plan.gpu_hours, 2)}` : ""}`],
        ["Cost", (e) => money(e.cost)],
        ["Approved estimate", (e) => (e.plan ? money(e.plan.estimated_cost) : "no plan")],
        ["Used", (e) => (e.plan_used == null ? "—" : h("span", {}, h("meter", { min: 0, max: 1, high: 0.8, optimum: 0, value: Math.min(e.plan_used, 1), "aria-label": `${Math.round(e.plan_used * 100)} % of the plan` }), ` ${Math.round(e.plan_used * 100)} %`))],
        ["Plan", (e) => (e.over_plan ? badge(e.over_plan === "cost" ? "over budget" : "over GPU-hours", "exceeded") : e.plan ? badge("within plan", "ok") : "—")],
        ["Planned until", (e) => (e.planned_until ? fmtTime(e.planned_until) : "—")],
      ], report.endpoints || [], { empty: "No endpoint has held GPUs yet." }));
    } catch (error) {
      costs.replaceChildren(errorBox(error, "Metering service"));
    }
  }

  await Promise.all([load(), loadPool(), loadCosts()]);
  return () => window.clearTimeout(timer);
}
