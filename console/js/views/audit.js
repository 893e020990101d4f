// The audit trail of every service (platform admins), and the verification of its hash chain:
// green when every record links to the one before, red with the records named otherwise.

import { api } from "../api.js";
import { announce, downloadText, errorBox, field, fmtTime, h, input, loading, section, table } from "../dom.js";

const DAY = 86400 * 1000;
const isoDay = (date) => date.toISOString().slice(0, 10);

export async function render(main) {
  const verdict = h("div", { id: "audit-verify", "aria-live": "polite" }, loading("Verifying the chain…"));
  const list = h("div", {}, loading());
  const filters = { service: input({ id: "audit-service", maxlength: 32 }), actor: input({ id: "audit-actor", maxlength: 255 }), project: input({ id: "audit-project", maxlength: 63 }), action: input({ id: "audit-action", maxlength: 100 }) };
  const more = h("div", { class: "actions" });
  const form = h("form", { class: "row", role: "search", onsubmit: (e) => { e.preventDefault(); load(null); } },
    field({ label: "Service", control: filters.service }),
    field({ label: "Actor", control: filters.actor }),
    field({ label: "Project", control: filters.project }),
    field({ label: "Action", control: filters.action, help: "e.g. request.approved" }),
    h("div", { class: "field" }, h("button", { type: "submit", class: "secondary" }, "Filter")));
  main.append(
    h("div", { class: "view-head" }, h("div", {},
      h("h1", {}, "Audit trail"),
      h("p", { class: "lede" }, "Every state change in every service, append-only; each record carries a keyed hash of the one before, and the head is signed every few seconds, so an edit, a deletion, a reordering or a cut tail shows.")),
      h("button", { type: "button", class: "primary", id: "verify-button", onclick: () => verify() }, "Verify the chain")),
    verdict, reportPanel(), section("Records", form, list, more));

  async function verify() {
    verdict.replaceChildren(loading("Verifying the chain…"));
    try {
      const v = await api("approval", "/v1/audit/verify");
      if (v.ok) {
        verdict.replaceChildren(h("div", { class: "alert alert-ok audit-verify", role: "status", "data-ok": "true" },
          h("strong", {}, "✓ Chain verified. "), `${v.records} records, head #${v.head_seq} `, h("code", {}, String(v.head_hash).slice(0, 16)), "…",
          v.checkpoint ? `; signed up to #${v.checkpoint.seq} at ${fmtTime(v.checkpoint.at)}.` : "; no signed checkpoint yet."));
      } else {
        verdict.replaceChildren(h("div", { class: "alert alert-error audit-verify", role: "alert", "data-ok": "false" },
          h("strong", {}, "✗ The chain is broken. "), `${v.problems.length} problem(s) in ${v.records} records:`,
          h("ul", {}, v.problems.map((p) => h("li", {}, `${p.seq === null ? "" : `#${p.seq} `}${p.problem}: ${p.detail}`)))));
      }
    } catch (error) {
      verdict.replaceChildren(errorBox(error, "Verify"));
    }
  }

  async function load(cursor) {
    const query = { limit: 50, cursor };
    for (const [key, el] of Object.entries(filters)) if (el.value.trim()) query[key] = el.value.trim();
    if (!cursor) list.replaceChildren(loading());
    try {
      const page = await api("approval", "/v1/audit", { query });
      const rendered = table([
        ["#", (r) => r.seq],
        ["When", (r) => fmtTime(r.at)],
        ["Service", (r) => r.service],
        ["Actor", (r) => r.actor],
        ["Action", (r) => h("code", {}, r.action)],
        ["Target", (r) => r.target],
        ["Project", (r) => r.project || "—"],
        ["Change", (r) => (r.before || r.after
          ? h("details", { class: "json" }, h("summary", {}, "before / after"), h("pre", {}, JSON.stringify({ before: r.before, after: r.after }, null, 2)))
          : "")],
      ], page.items, { empty: "No records match." });
      if (cursor) list.append(rendered);
      else list.replaceChildren(rendered);
      more.replaceChildren(page.next_cursor ? h("button", { type: "button", class: "secondary", onclick: () => load(page.next_cursor) }, "Older records") : "");
    } catch (error) {
      list.replaceChildren(errorBox(error, "Audit"));
    }
  }

  await Promise.all([verify(), load(null)]);
}

/** The audit report of a period, as an auditor takes it away (HTML to read, CSV to sort). */
function reportPanel() {
  const now = new Date();
  const from = input({ type: "date", id: "report-from", value: isoDay(new Date(now.getTime() - 30 * DAY)) });
  const to = input({ type: "date", id: "report-to", value: isoDay(new Date(now.getTime() + DAY)) });
  const status = h("p", { class: "help", id: "report-status", "aria-live": "polite" });
  async function download(format) {
    status.textContent = "Preparing the report…";
    try {
      const body = await api("approval", "/v1/reports/audit", { query: { start: from.value, end: to.value, format }, text: true });
      downloadText(`steward-audit-${from.value}-${to.value}.${format}`, body, format === "csv" ? "text/csv" : "text/html");
      status.textContent = `Downloaded the ${format.toUpperCase()} report for ${from.value} to ${to.value}.`;
    } catch (error) {
      status.textContent = "";
      announce(`Report: ${error.detail}`, "error");
    }
  }
  return section("Audit report",
    h("p", { class: "help" }, "Approvals with their decisions and lead times against the SLA, keys created and revoked, access and catalog changes, and the chain's verification with its signed checkpoint."),
    h("div", { class: "row" },
      field({ label: "From", control: from }),
      field({ label: "To (excluded)", control: to }),
      h("div", { class: "field" }, h("button", { type: "button", class: "secondary", id: "report-html", onclick: () => download("html") }, "Download HTML")),
      h("div", { class: "field" }, h("button", { type: "button", class: "secondary", id: "report-csv", onclick: () => download("csv") }, "Download CSV"))),
    status);
}
