// Projects (platform admins): the tenancy unit; create one, then add members and issue keys.

import { api } from "../api.js";
import { announce, errorBox, field, fmtTime, h, input, loading, section, showErrors, table } from "../dom.js";

export async function render(main, ctx) {
  const list = h("div", {}, loading());
  const name = input({ id: "project-name", autocomplete: "off", maxlength: 63, pattern: "[a-z0-9]([-a-z0-9]*[a-z0-9])?" });
  const display = input({ id: "project-display", maxlength: 200 });
  const summary = h("div", { class: "alert alert-error", role: "alert", hidden: true, tabindex: "-1" });
  const form = h("form", { novalidate: true },
    h("div", { class: "row" },
      field({ label: "Name", control: name, name: "name", help: "A DNS label, like a Kubernetes namespace: fraud-detection" }),
      field({ label: "Display name", control: display, name: "display_name", hint: "(optional)" })),
    summary, h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Create project")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { name: name.value.trim() };
    if (display.value.trim()) body.display_name = display.value.trim();
    try {
      await api("authz", "/v1/projects", { method: "POST", body });
      announce(`Project ${body.name} created`, "ok");
      window.sessionStorage.setItem("steward.project", body.name);
      await ctx.refreshProjects();
      await load();
      form.reset();
    } catch (error) {
      showErrors(form, error, summary);
    }
  });
  main.append(
    h("div", { class: "view-head" }, h("div", {}, h("h1", {}, "Projects"), h("p", { class: "lede" }, "Teams work in projects: members have roles there, keys and quotas belong to one."))),
    section("Create a project", form), section("All projects", list));

  async function load() {
    try {
      const projects = await api("authz", "/v1/projects");
      list.replaceChildren(table([
        ["Name", (p) => h("button", { type: "button", class: "link", onclick: () => { window.sessionStorage.setItem("steward.project", p.name); ctx.refreshProjects().then(() => ctx.go("project")); } }, p.name)],
        ["Display name", (p) => p.display_name],
        ["Created", (p) => fmtTime(p.created_at)],
        ["By", (p) => p.created_by],
      ], projects, { empty: "No projects yet." }));
    } catch (error) {
      list.replaceChildren(errorBox(error, "Projects"));
    }
  }
  await load();
}
