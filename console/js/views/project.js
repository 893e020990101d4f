// One project: what it is entitled to use (granted by approved access requests) and who its
// members are. Project and platform admins manage members here.

import { api } from "../api.js";
import { announce, confirmDialog, errorBox, field, fmtTime, h, input, loading, section, select, showErrors, table } from "../dom.js";

export async function render(main, ctx) {
  const project = ctx.project;
  const entitlements = h("div", { id: "entitlements" }, loading());
  const members = h("div", {}, loading());
  main.append(
    h("div", { class: "view-head" }, h("div", {},
      h("h1", {}, `Project ${project}`),
      h("p", { class: "lede" }, `Your role here: ${ctx.role() || "none"}. Entitlements come from approved access requests; the gateway lets the project's keys call exactly these.`))),
    section("Entitlements", entitlements),
    section("Members", members));

  try {
    const list = await api("authz", `/v1/projects/${encodeURIComponent(project)}/entitlements`);
    entitlements.replaceChildren(table([
      ["Asset", (e) => h("code", {}, e.asset_name)],
      ["Kind", (e) => (e.asset_kind === "model" ? "model" : "MCP server")],
      ["Granted", (e) => fmtTime(e.granted_at)],
      ["By", (e) => e.granted_by],
      ["Reason", (e) => e.reason],
    ], list, { empty: "No entitlements yet: request access to an approved model or MCP server." }));
  } catch (error) {
    entitlements.replaceChildren(errorBox(error, "Entitlements"));
  }

  async function loadMembers() {
    try {
      const list = await api("authz", `/v1/projects/${encodeURIComponent(project)}/members`);
      const manage = ctx.can("member.write");
      members.replaceChildren(table([
        ["Member", (m) => m.subject],
        ["Role", (m) => m.role],
        ["Since", (m) => fmtTime(m.created_at)],
        ...(manage ? [["", (m) => h("button", { type: "button", class: "secondary", onclick: async () => {
          const ok = await confirmDialog({ title: `Remove ${m.subject} from ${project}?`, body: "Their keys for this project stop working.", confirm: "Remove", danger: true });
          if (!ok) return;
          try {
            await api("authz", `/v1/projects/${encodeURIComponent(project)}/members/${encodeURIComponent(m.subject)}`, { method: "DELETE" });
            announce(`${m.subject} removed`, "ok");
            await loadMembers();
          } catch (error) {
            announce(`Not removed: ${error.detail}`, "error");
          }
        } }, "Remove")]] : []),
      ], list, { empty: "No members." }));
      if (manage) members.append(memberForm(project, loadMembers));
    } catch (error) {
      members.replaceChildren(errorBox(error, "Members"));
    }
  }
  await loadMembers();
}

function memberForm(project, done) {
  const subject = input({ id: "member-subject", autocomplete: "off", maxlength: 255 });
  const role = select([["developer", "developer"], ["viewer", "viewer"], ["project-admin", "project admin"]], { id: "member-role" });
  const summary = h("div", { class: "alert alert-error", role: "alert", hidden: true, tabindex: "-1" });
  const form = h("form", { novalidate: true, class: "row" },
    field({ label: "Member (user name or OIDC subject)", control: subject, name: "subject" }),
    field({ label: "Role", control: role, name: "role" }),
    h("div", { class: "field" }, h("button", { type: "submit", class: "primary" }, "Add or change member")), summary);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!subject.value.trim()) {
      showErrors(form, { title: "Missing", errors: [{ field: "subject", message: "Name the member" }] }, summary);
      return;
    }
    try {
      await api("authz", `/v1/projects/${encodeURIComponent(project)}/members/${encodeURIComponent(subject.value.trim())}`, { method: "PUT", body: { role: role.value } });
      announce(`${subject.value.trim()} is ${role.value} in ${project}`, "ok");
      await done();
    } catch (error) {
      showErrors(form, error, summary);
    }
  });
  return form;
}
