// The approval queue (platform admins): pending requests with their SLA clocks, overdue first;
// the plan and estimated cost of endpoint requests; the checklist of asset requests; approve or
// reject with a comment (a rejection needs one: the requester reads it).

import { api } from "../api.js";
import { announce, badge, errorBox, facts, field, fmtDuration, fmtMoney, fmtTime, h, loading, section, showErrors, table } from "../dom.js";
import { describe } from "./request.js";

export function slaText(request, now = Date.now()) {
  const left = (new Date(request.due_at).getTime() - now) / 1000;
  return left >= 0 ? { text: `${fmtDuration(left)} left`, overdue: false } : { text: `overdue by ${fmtDuration(-left)}`, overdue: true };
}

/** Overdue first (most overdue at the top), then by the time left. */
export function queueOrder(items, now = Date.now()) {
  return [...items].sort((a, b) => {
    const da = new Date(a.due_at).getTime();
    const db = new Date(b.due_at).getTime();
    const oa = da < now;
    const ob = db < now;
    if (oa !== ob) return oa ? -1 : 1;
    return da - db;
  });
}

export async function render(main, ctx) {
  const list = h("div", { id: "queue-list" }, loading());
  const stats = h("div", {});
  const decided = h("div", {});
  main.append(
    h("div", { class: "view-head" }, h("div", {},
      h("h1", {}, "Approval queue"),
      h("p", { class: "lede" }, "Overdue requests first. Approving publishes the decision; the owning service acts on it (catalog admits the version, authz grants access, inference provisions, metering raises the quota)."))),
    list, section("Recently decided", decided), stats);

  const clocks = [];
  const tick = () => {
    for (const { el, request } of clocks) {
      const sla = slaText(request);
      el.textContent = sla.text;
      el.classList.toggle("overdue", sla.overdue);
      el.classList.toggle("ontime", !sla.overdue);
    }
  };

  async function refresh() {
    clocks.length = 0;
    let page;
    try {
      page = await api("approval", "/v1/requests", { query: { status: "pending", limit: 200 } });
    } catch (error) {
      list.replaceChildren(errorBox(error, "Queue"));
      return;
    }
    const items = queueOrder(page.items);
    const overdue = items.filter((r) => slaText(r).overdue).length;
    list.replaceChildren(
      h("p", { role: "status", id: "queue-count" }, items.length ? `${items.length} pending, ${overdue} overdue.` : "Nothing waits for a decision."),
      ...items.map((r) => card(r)),
    );
    tick();
    loadDecided();
    loadStats();
  }

  function card(r) {
    const sla = slaText(r);
    const clock = h("span", { class: ["sla", sla.overdue ? "overdue" : "ontime"] }, sla.text);
    clocks.push({ el: clock, request: r });
    const headingId = `q-${r.id}`;
    const comment = h("textarea", { rows: 2, maxlength: 5000, id: `comment-${r.id}` });
    const summary = h("div", { class: "alert alert-error", role: "alert", hidden: true, tabindex: "-1" });
    const form = h("form", { novalidate: true },
      field({ label: "Comment", control: comment, name: "comment", help: "Optional to approve; required to reject (the requester reads it)." }),
      summary,
      h("div", { class: "actions" },
        h("button", { type: "submit", class: "ok", value: "approve" }, "Approve"),
        h("button", { type: "submit", class: "danger", value: "reject" }, "Reject")));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const verb = event.submitter?.value || "approve";
      if (verb === "reject" && !comment.value.trim()) {
        showErrors(form, { title: "A rejection needs a comment", errors: [{ field: "comment", message: "Say why, so the requester can act on it" }] }, summary);
        return;
      }
      for (const b of form.querySelectorAll("button")) b.disabled = true;
      try {
        const done = await api("approval", `/v1/requests/${encodeURIComponent(r.id)}/${verb}`, { method: "POST", body: { comment: comment.value.trim() } });
        announce(`${describe(r)} for ${r.project}: ${done.status}`, "ok");
        await refresh();
        document.getElementById("queue-count")?.focus?.();
      } catch (error) {
        for (const b of form.querySelectorAll("button")) b.disabled = false;
        showErrors(form, error, summary);
      }
    });
    const p = r.payload || {};
    let extra = null;
    if (r.kind === "endpoint" && p.plan) {
      extra = h("div", { class: "cost-box" },
        h("span", {}, "Estimated cost"),
        h("output", {}, r.cost ? fmtMoney(r.cost.estimated_cost, r.cost.currency) : "—"),
        facts([
          ["GPU-hours", r.cost ? `${r.cost.gpu_hours} (${p.plan.gpus} GPU × ${p.plan.replicas} replica × ${p.plan.hours} h)` : null],
          ["Rate", `${p.plan.gpu_hour_rate} ${p.plan.currency || ""} per GPU-hour`],
          ["GPU type", p.plan.gpu_type],
          ["Data classification", p.plan.data_classification],
          ["Network exposure", p.plan.network_exposure],
          ["Runtime", p.runtime],
        ]));
    } else if (r.kind === "asset" && p.checklist?.length) {
      extra = h("ul", { class: "checklist" }, p.checklist.map((c) => h("li", { class: c.ok ? "ok" : "fail" }, `${c.check}: ${c.detail}`)));
    } else if (p.justification) {
      extra = h("p", {}, h("strong", {}, "Justification: "), p.justification);
    }
    return h("section", { class: ["panel", "queue-item", sla.overdue ? "overdue" : null], "aria-labelledby": headingId },
      h("h2", { id: headingId }, `${r.kind[0].toUpperCase()}${r.kind.slice(1)} · ${r.project}`),
      h("p", {}, describe(r)),
      facts([
        ["Requested by", r.requester],
        ["Filed", fmtTime(r.created_at)],
        ["Due", h("span", {}, fmtTime(r.due_at), " — ", clock)],
        ["Tags", p.tags],
      ]),
      extra, form);
  }

  async function loadDecided() {
    try {
      const page = await api("approval", "/v1/requests", { query: { status: ["approved", "rejected"], order: "newest", limit: 10 } });
      const items = [...page.items].sort((a, b) => String(b.decided_at).localeCompare(String(a.decided_at)));
      decided.replaceChildren(table([
        ["Decided", (r) => fmtTime(r.decided_at)],
        ["Project", (r) => r.project],
        ["What", (r) => describe(r)],
        ["Outcome", (r) => badge(r.status)],
        ["By", (r) => r.decided_by],
        ["Lead time", (r) => (r.lead_time_seconds === null ? "—" : fmtDuration(r.lead_time_seconds))],
      ], items, { empty: "No decisions yet." }));
    } catch (error) {
      decided.replaceChildren(errorBox(error, "Decisions"));
    }
  }

  async function loadStats() {
    try {
      const s = await api("approval", "/v1/requests/stats");
      const kinds = Object.entries(s.by_kind || {});
      stats.replaceChildren(h("div", { class: "panel" }, table([
        ["Kind", ([k]) => k],
        ["Pending", ([, v]) => v.pending],
        ["Overdue", ([, v]) => v.overdue],
        ["Decided (90 d)", ([, v]) => v.decided],
        ["Lead time median", ([, v]) => (v.lead_time_median_seconds === null ? "—" : fmtDuration(v.lead_time_median_seconds))],
        ["Lead time p90", ([, v]) => (v.lead_time_p90_seconds === null ? "—" : fmtDuration(v.lead_time_p90_seconds))],
      ], kinds, { caption: "Lead time per kind" })));
    } catch {
      stats.replaceChildren();
    }
  }

  await refresh();
  const timer = window.setInterval(tick, 30_000);
  return () => window.clearInterval(timer);
}
