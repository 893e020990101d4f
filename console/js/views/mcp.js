// MCP servers: the ones the signed-in caller may use (the gateway's GET /mcp/: URL and tools with
// their access types, as a client is given them), the approved ones it may still ask for (whole
// or read-only), and tool calls by tool from metering.

import { allPages, api } from "../api.js";
import { announce, badge, copyText, errorBox, h, loading, section, table } from "../dom.js";

const WEEK = 7 * 86400 * 1000;

export async function render(main, ctx) {
  const usable = h("div", { id: "mcp-usable" }, loading());
  const requestable = h("div", { id: "mcp-requestable" });
  const byTool = h("div", { id: "mcp-usage" });
  main.append(
    h("div", { class: "view-head" }, h("div", {},
      h("h1", {}, "MCP servers"),
      h("p", { class: "lede" }, "Approved MCP servers behind the gateway: only catalogued tools are listed and callable, each call is metered, and tools that may change something are audited."))),
    section("Yours to use", h("p", { class: "help" }, "Give an MCP client the URL and an API key with mcp:invoke (or an OAuth token): it needs nothing else."), usable),
    section("Approved, not yet yours", requestable),
  );
  if (ctx.can("usage.read", null)) main.append(section("Tool calls, last 7 days", byTool));

  let servers = [];
  try {
    servers = (await api("gateway", "/mcp/")).data || [];
    usable.replaceChildren(servers.length ? serverTable(servers) : h("p", { class: "empty" }, "No MCP server yet: ask for access below."));
  } catch (error) {
    usable.replaceChildren(errorBox(error, "Gateway"));
  }

  if (ctx.can("catalog.read", null)) {
    try {
      const approved = await allPages("catalog", "/v1/catalog", { status: "approved", kind: "mcp_server" });
      const mine = new Set(servers.map((s) => s.name));
      const names = [...new Set(approved.map((v) => v.name))].filter((n) => !mine.has(n));
      const canAsk = ctx.project && ctx.can("request.write");
      requestable.replaceChildren(table([
        ["Server", (name) => h("code", {}, name)],
        ["Access", (name) => (canAsk ? h("span", { class: "actions" },
          h("a", { href: `#/request?kind=access&asset=${encodeURIComponent(`mcp_server|${name}`)}` }, "Request access"),
          " · ",
          h("a", { href: `#/request?kind=access&tools=read_only&asset=${encodeURIComponent(`mcp_server|${name}`)}` }, "read-only tools only"))
          : "a project member with requests:write asks for it")],
      ], names, { caption: `${names.length} approved server${names.length === 1 ? "" : "s"} this project cannot use yet`, empty: "Every approved MCP server is yours already." }));
    } catch (error) {
      requestable.replaceChildren(errorBox(error, "Catalog"));
    }
  }

  if (ctx.can("usage.read", null)) {
    byTool.replaceChildren(loading());
    const end = new Date();
    try {
      const usage = await api("metering", "/v1/usage", { query: { start: new Date(end.getTime() - WEEK).toISOString(), end: end.toISOString(), project: ctx.project || null, group_by: "model,tool" } });
      const rows = (usage.rows || []).filter((r) => r.tool);
      byTool.replaceChildren(table([
        ["Server", (r) => h("code", {}, r.model)],
        ["Tool", (r) => h("code", {}, r.tool)],
        ["Calls", (r) => String(r.requests)],
        ["Errors", (r) => String(r.errors)],
      ], rows, { caption: "Tool calls by server and tool", empty: "No tool calls in the last 7 days." }));
    } catch (error) {
      byTool.replaceChildren(errorBox(error, "Metering"));
    }
  }
}

function serverTable(servers) {
  return table([
    ["Server", (s) => h("code", {}, s.name)],
    ["Version", (s) => s.version],
    ["URL", (s) => h("span", {}, h("code", {}, s.url), " ", h("button", { type: "button", class: "secondary small", "aria-label": `Copy the URL of ${s.name}`, onclick: async () => announce(await copyText(s.url) ? `Copied the URL of ${s.name}` : "Could not copy: select the URL", "ok") }, "Copy"))],
    ["Tools", (s) => (s.tools.length
      ? h("ul", { class: "tools" }, ...s.tools.map((t) => h("li", {}, h("code", {}, t.name), " ", badge(t.access.replace(/_/g, " "), t.access))))
      : "none approved")],
  ], servers, { caption: `${servers.length} MCP server${servers.length === 1 ? "" : "s"}` });
}
