// DOM helpers. Every value reaches the page through textContent or setAttribute, never as
// markup: data from the APIs (names, descriptions, comments) is untrusted text.

const SVG_NS = "http://www.w3.org/2000/svg";
const URL_ATTRS = new Set(["href", "src", "action", "formaction", "xlink:href"]);

function apply(el, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") {
      el.textContent = String(value);
    } else if (name === "class") {
      el.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    } else if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (name === "value" && "value" in el) {
      el.value = String(value);
    } else if (name === "checked" || name === "selected" || name === "disabled") {
      el[name] = Boolean(value);
    } else if (URL_ATTRS.has(name)) {
      el.setAttribute(name, safeUrl(String(value)));
    } else if (name.startsWith("on")) {
      throw new Error(`event handler ${name} must be a function`);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** h("p", {class: "x"}, "text", h("b", {}, name)) — an element with text children. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  apply(el, attrs);
  append(el, children);
  return el;
}

/** The same for SVG elements (charts). */
export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  apply(el, attrs);
  append(el, children);
  return el;
}

/** Only http(s), relative and mailto links: never javascript: or data: from an API value. */
export function safeUrl(value) {
  const text = String(value).trim();
  if (text.startsWith("/") || text.startsWith("#")) return text;
  try {
    const url = new URL(text, window.location.href);
    if (["http:", "https:", "mailto:"].includes(url.protocol)) return url.href;
  } catch {
    /* not a URL */
  }
  return "#";
}

/** Save text the console made itself (a report it fetched) as a file: a blob: URL of our own
 * bytes, never an address from an API value, so it does not go through safeUrl. */
export function downloadText(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

export function isWebUrl(value) {
  try {
    return ["http:", "https:"].includes(new URL(String(value)).protocol);
  } catch {
    return false;
  }
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

let uid = 0;
export function nextId(prefix = "f") {
  uid += 1;
  return `${prefix}-${uid}`;
}

/**
 * A labelled form field: <label for>, the control, optional help and an error slot that the
 * control names in aria-describedby. `control` is an element or a function(id) → element.
 * `name` is the API field the server reports errors for (e.g. "payload.plan.gpus").
 */
export function field({ label, control, help, name, hint }) {
  const input = typeof control === "function" ? control(nextId("f")) : control;
  if (!input.id) input.id = nextId("f");
  const describedBy = [];
  const helpEl = help ? h("p", { class: "help", id: `${input.id}-help` }, help) : null;
  if (helpEl) describedBy.push(helpEl.id);
  const errorEl = h("p", { class: "field-error", id: `${input.id}-error`, hidden: true });
  describedBy.push(errorEl.id);
  input.setAttribute("aria-describedby", describedBy.join(" "));
  if (name) input.dataset.field = name;
  const labelEl = h("label", { for: input.id }, label, hint ? h("span", { class: "hint" }, ` ${hint}`) : null);
  return h("div", { class: "field" }, labelEl, input, helpEl, errorEl);
}

export function input(attrs = {}) {
  return h("input", { type: "text", ...attrs });
}

export function select(options, attrs = {}) {
  const el = h("select", attrs);
  for (const opt of options) {
    const [value, text] = Array.isArray(opt) ? opt : [opt, opt];
    el.append(h("option", { value }, text));
  }
  if (attrs.value !== undefined) el.value = String(attrs.value);
  return el;
}

/** Show a problem's field errors next to the fields of `form`; the rest above it. */
export function showErrors(form, error, summary) {
  clearErrors(form);
  const unplaced = [];
  for (const item of error?.errors || []) {
    const fieldName = String(item.field || "");
    const target = findField(form, fieldName);
    if (target) {
      const slot = form.querySelector(`#${CSS.escape(target.id)}-error`);
      if (slot) {
        slot.hidden = false;
        slot.textContent = item.message || "invalid";
        target.setAttribute("aria-invalid", "true");
        continue;
      }
    }
    unplaced.push(fieldName ? `${fieldName}: ${item.message}` : item.message);
  }
  const first = form.querySelector("[aria-invalid='true']");
  if (summary) {
    summary.hidden = false;
    summary.replaceChildren(
      h("strong", {}, error?.title || "Not saved"),
      " ",
      unplaced.length ? unplaced.join("; ") : error?.detail || String(error?.message || error),
    );
  }
  (first || summary)?.focus?.();
}

function findField(form, name) {
  if (!name) return null;
  const controls = [...form.querySelectorAll("[data-field]")];
  // Exact name, or the longest field name the error's path ends with ("payload.plan.gpus").
  const exact = controls.find((c) => c.dataset.field === name);
  if (exact) return exact;
  const matches = controls.filter((c) => name.endsWith(`.${c.dataset.field}`) || c.dataset.field.endsWith(`.${name}`));
  matches.sort((a, b) => b.dataset.field.length - a.dataset.field.length);
  return matches[0] || null;
}

export function clearErrors(form) {
  for (const el of form.querySelectorAll(".field-error")) {
    el.hidden = true;
    el.textContent = "";
  }
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

/** A polite announcement for screen readers, and the same text as a visible toast. */
export function announce(message, kind = "info") {
  const live = document.getElementById("live");
  if (live) {
    live.textContent = "";
    // A new text node after clearing, so that repeated messages are read again.
    window.setTimeout(() => {
      live.textContent = message;
    }, 30);
  }
  const toasts = document.getElementById("toasts");
  if (toasts) {
    const toast = h("div", { class: ["toast", `toast-${kind}`], role: kind === "error" ? "alert" : null }, message);
    toasts.append(toast);
    while (toasts.children.length > 3) toasts.firstElementChild.remove();
    window.setTimeout(() => toast.remove(), kind === "error" ? 8000 : 3500);
  }
}

/** A modal confirmation (native <dialog>: focus is trapped and returned). */
export function confirmDialog({ title, body, confirm = "Confirm", danger = false, withReason = null }) {
  return new Promise((resolve) => {
    const reasonField = withReason
      ? field({ label: withReason.label, control: h("textarea", { rows: 3, required: withReason.required || null }), help: withReason.help })
      : null;
    const ok = h("button", { type: "submit", class: danger ? "danger" : "primary" }, confirm);
    const cancel = h("button", { type: "button", class: "secondary" }, "Cancel");
    const titleId = nextId("dlg");
    const form = h("form", { method: "dialog" }, h("h2", { id: titleId }, title), body ? h("p", {}, body) : null, reasonField, h("div", { class: "actions" }, ok, cancel));
    const dialog = h("dialog", { "aria-labelledby": titleId }, form);
    let result = null;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const reason = reasonField ? reasonField.querySelector("textarea").value.trim() : "";
      if (withReason?.required && !reason) {
        const err = reasonField.querySelector(".field-error");
        err.hidden = false;
        err.textContent = "Required";
        reasonField.querySelector("textarea").setAttribute("aria-invalid", "true");
        reasonField.querySelector("textarea").focus();
        return;
      }
      result = { reason };
      dialog.close();
    });
    cancel.addEventListener("click", () => dialog.close());
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(result);
    });
    document.body.append(dialog);
    dialog.showModal();
    (reasonField ? reasonField.querySelector("textarea") : cancel).focus();
  });
}

/** Copy text, with a fallback for pages that are not a secure context (plain http). */
export async function copyText(text, fallbackInput) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    if (fallbackInput) {
      fallbackInput.focus();
      fallbackInput.select();
      try {
        return document.execCommand("copy");
      } catch {
        return false;
      }
    }
    return false;
  }
}

// -- formatting ------------------------------------------------------------------------------

export function fmtTime(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function fmtDuration(seconds) {
  const s = Math.abs(Math.round(seconds));
  const d = Math.floor(s / 86400);
  const hours = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d) return `${d} d ${hours} h`;
  if (hours) return `${hours} h ${m} min`;
  if (m) return `${m} min`;
  return `${s} s`;
}

export function fmtNumber(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(Number(value))) return "—";
  return Number(value).toLocaleString(undefined, { maximumFractionDigits: digits });
}

export function fmtMoney(value, currency = "USD") {
  if (value === null || value === undefined) return "—";
  try {
    return Number(value).toLocaleString(undefined, { style: "currency", currency, minimumFractionDigits: 2, maximumFractionDigits: 2 });
  } catch {
    return `${currency} ${Number(value).toFixed(2)}`;
  }
}

export function badge(text, kind = text) {
  return h("span", { class: ["badge", `badge-${String(kind).replace(/[^a-z0-9_-]/gi, "")}`] }, text);
}

/** A small key/value list (<dl>) that skips empty values. */
export function facts(pairs) {
  const dl = h("dl", { class: "facts" });
  for (const [key, value] of pairs) {
    if (value === null || value === undefined || value === "" || (Array.isArray(value) && !value.length)) continue;
    dl.append(h("dt", {}, key), h("dd", {}, value instanceof Node ? value : Array.isArray(value) ? value.join(", ") : String(value)));
  }
  return dl;
}

/** A table from rows; `columns` = [[header, row => cell (text or Node)]]. */
export function table(columns, rows, { caption, empty = "Nothing yet." } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  const head = h("tr", {}, columns.map(([title]) => h("th", { scope: "col" }, title)));
  const body = rows.map((row) => h("tr", {}, columns.map(([, cell]) => {
    const value = cell(row);
    return h("td", {}, value instanceof Node ? value : value === null || value === undefined ? "—" : String(value));
  })));
  return h("div", { class: "table-wrap" }, h("table", {}, caption ? h("caption", {}, caption) : null, h("thead", {}, head), h("tbody", {}, body)));
}

export function section(title, ...children) {
  const id = nextId("sec");
  return h("section", { class: "panel", "aria-labelledby": id }, h("h2", { id }, title), ...children);
}

export function loading(text = "Loading…") {
  return h("p", { class: "loading", role: "status" }, text);
}

export function errorBox(error, what = "") {
  const status = error?.status ? ` (${error.status})` : "";
  return h("div", { class: "alert alert-error", role: "alert" }, h("strong", {}, `${what || "Error"}${status}: `), error?.detail || error?.message || String(error));
}
