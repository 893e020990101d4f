// API keys: create (the key is shown once, with a copy button), rotate (the old key keeps
// working for a grace period), revoke. Project keys; platform keys for platform admins.

import { api } from "../api.js";
import { announce, badge, confirmDialog, copyText, errorBox, field, fmtTime, h, input, loading, section, select, showErrors, table } from "../dom.js";

const SCOPES = ["catalog:read", "requests:write", "inference:invoke", "mcp:invoke", "usage:read", "keys:manage", "endpoints:manage", "projects:read", "projects:manage", "catalog:write", "approvals:review", "quotas:manage", "audit:read", "snapshots:read"];
const APP_DEFAULT = ["inference:invoke", "mcp:invoke"];

export async function render(main, ctx) {
  const secretSlot = h("div", { id: "secret-slot" });
  main.append(
    h("div", { class: "view-head" }, h("div", {},
      h("h1", {}, "API keys"),
      h("p", { class: "lede" }, "Keys authenticate apps at the gateway (Authorization: Bearer stw_…) and people at the console. A key is shown once; Steward keeps only a keyed hash."))),
    secretSlot);

  const showSecret = (created, verb) => {
    const field_ = h("input", { type: "text", readonly: true, id: "new-key", value: created.key, class: "mono", spellcheck: "false" });
    const copy = h("button", { type: "button", class: "primary", id: "copy-key", onclick: async () => {
      const ok = await copyText(created.key, field_);
      announce(ok ? "Key copied to the clipboard" : "Copy failed: select the key and copy it by hand", ok ? "ok" : "error");
    } }, "Copy");
    const panel = h("section", { class: "panel secret-once", "aria-labelledby": "secret-title", role: "region" },
      h("h2", { id: "secret-title", tabindex: "-1" }, `Key ${created.id} ${verb} — copy it now, it is shown only once`),
      field({ label: "The new API key", control: field_, help: `Scopes: ${created.scopes.join(", ")}. Project: ${created.project || "platform"}. Owner: ${created.owner}.` }),
      h("div", { class: "actions" }, copy, h("button", { type: "button", class: "secondary", onclick: () => { secretSlot.replaceChildren(); announce("The key was removed from the page"); } }, "I have stored it — hide")));
    secretSlot.replaceChildren(panel);
    panel.querySelector("h2").focus();
  };

  if (ctx.project && ctx.can("key.read")) {
    main.append(keySection({
      title: `Keys of project ${ctx.project}`,
      base: `/v1/projects/${encodeURIComponent(ctx.project)}/keys`,
      ctx,
      canOwner: ["project-admin", "platform-admin"].includes(ctx.role()),
      canWrite: ctx.can("key.write"),
      showSecret,
    }));
  }
  if (ctx.can("platform_key.write", null)) {
    main.append(keySection({ title: "Platform keys (act as platform admin)", base: "/v1/platform/keys", ctx, platform: true, canWrite: true, showSecret }));
  }
  for (const s of main.querySelectorAll("[data-load]")) await s.load();
}

function keySection({ title, base, ctx, canOwner = false, canWrite, platform = false, showSecret }) {
  const area = h("div", {}, loading());
  const el = section(title, area);
  el.dataset.load = "1";
  const prefix = platform ? "pk" : "k";

  async function load() {
    let keys;
    try {
      keys = await api("authz", base);
    } catch (error) {
      area.replaceChildren(errorBox(error, "Keys"));
      return;
    }
    keys.sort((a, b) => (a.status === b.status ? String(b.created_at).localeCompare(String(a.created_at)) : a.status === "active" ? -1 : 1));
    const actions = (k) => {
      if (!canWrite || k.status !== "active") return "";
      return h("div", { class: "actions" },
        h("button", { type: "button", class: "secondary", "aria-label": `Rotate key ${k.name} (${k.id})`, onclick: async () => {
          const answer = await confirmDialog({ title: `Rotate ${k.name} (${k.id})?`, body: "A new key replaces it; the old one keeps working for the grace period (24 hours by default) so apps can switch.", confirm: "Rotate" });
          if (!answer) return;
          try {
            showSecret(await api("authz", `${base}/${encodeURIComponent(k.id)}/rotate`, { method: "POST", body: {} }), "rotated");
            await load();
          } catch (error) {
            announce(`Not rotated: ${error.detail}`, "error");
          }
        } }, "Rotate"),
        h("button", { type: "button", class: "danger", "aria-label": `Revoke key ${k.name} (${k.id})`, onclick: async () => {
          const answer = await confirmDialog({ title: `Revoke ${k.name} (${k.id})?`, body: "It stops working at the gateway within a second. This cannot be undone.", confirm: "Revoke", danger: true });
          if (!answer) return;
          try {
            await api("authz", `${base}/${encodeURIComponent(k.id)}`, { method: "DELETE" });
            announce(`Key ${k.id} revoked`, "ok");
            await load();
          } catch (error) {
            announce(`Not revoked: ${error.detail}`, "error");
          }
        } }, "Revoke"));
    };
    const columns = [
      ["Name", (k) => k.name],
      ["Id", (k) => h("code", {}, k.id)],
      ["Owner", (k) => `${k.owner} (${k.role})`],
      ["Scopes", (k) => k.scopes.join(", ")],
      ["Status", (k) => h("span", {}, badge(k.status), k.rotated_to ? ` → ${k.rotated_to}` : "")],
      ["Created", (k) => fmtTime(k.created_at)],
      ["Last used", (k) => fmtTime(k.last_used_at)],
      ["Expires", (k) => fmtTime(k.expires_at)],
    ];
    // Steward's own processes' keys apart, without buttons: they change in the deployment.
    const services = keys.filter((k) => k.service);
    area.replaceChildren(table([...columns, ["", actions]], keys.filter((k) => !k.service), { empty: "No keys yet." }));
    if (services.length) {
      area.append(h("div", { id: `${prefix}-service-keys` },
        h("h3", {}, "Service keys"),
        h("p", { class: "help" }, "The keys Steward's own services run with (least privilege). They are replaced in the deployment (STEWARD_GATEWAY_API_KEY, STEWARD_INFERENCE_API_KEY) and installed when the service starts; revoking one here would cut the service off."),
        table(columns, services)));
    }
    if (canWrite) area.append(createForm());
  }

  function createForm() {
    const own = new Set(ctx.principal.scopes || []);
    const name = input({ id: `${prefix}-name`, maxlength: 100, autocomplete: "off" });
    const boxes = h("div", { class: "checks" });
    for (const scope of SCOPES.filter((sc) => own.has(sc))) {
      const box = h("input", { type: "checkbox", value: scope, id: `${prefix}-scope-${scope.replace(":", "-")}`, checked: (platform ? ["snapshots:read"] : APP_DEFAULT).includes(scope) });
      boxes.append(h("label", { for: box.id }, box, scope));
    }
    const owner = canOwner ? input({ id: `${prefix}-owner`, maxlength: 255, autocomplete: "off" }) : null;
    const role = canOwner ? select([["", "the owner's role"], ["developer", "developer"], ["viewer", "viewer"], ["project-admin", "project admin"]], { id: `${prefix}-role` }) : null;
    const expires = input({ type: "datetime-local", id: `${prefix}-expires` });
    const summary = h("div", { class: "alert alert-error", role: "alert", hidden: true, tabindex: "-1" });
    const form = h("form", { novalidate: true },
      h("h3", {}, "Create a key"),
      h("div", { class: "row" },
        field({ label: "Name", control: name, name: "name", help: "What uses it: an app, a pipeline" }),
        owner ? field({ label: "Issue to member", control: owner, name: "owner", hint: "(optional; default: you)" }) : null,
        role ? field({ label: "Role of the key", control: role, name: "role" }) : null,
        field({ label: "Expires", control: expires, name: "expires_at", hint: "(optional, your local time)" })),
      h("fieldset", { "data-field": "scopes", id: `${prefix}-scopes` }, h("legend", {}, "Scopes (what the key may do; at most yours)"), boxes,
        h("p", { class: "field-error", id: `${prefix}-scopes-error`, hidden: true })),
      summary,
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Create key")));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const body = { name: name.value.trim(), scopes: [...boxes.querySelectorAll("input:checked")].map((b) => b.value) };
      if (owner?.value.trim()) body.owner = owner.value.trim();
      if (role?.value) body.role = role.value;
      if (expires.value) body.expires_at = new Date(expires.value).toISOString();
      try {
        showSecret(await api("authz", base, { method: "POST", body }), "created");
        await load();
      } catch (error) {
        showErrors(form, error, summary);
      }
    });
    return form;
  }

  el.load = load;
  return el;
}
