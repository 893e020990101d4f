// Hand-made SVG charts. Each is a <figure> with a caption, an SVG with role="img" and a text
// summary, and the numbers as a table under <details> (the accessible equivalent).

import { fmtNumber, h, nextId, s, table } from "./dom.js";

const COLOURS = ["#1d4ed8", "#f59e0b", "#15803d", "#b91c1c", "#7c3aed", "#0e7490"];

export function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

export function compact(value) {
  const n = Number(value);
  if (Math.abs(n) >= 1e9) return `${fmtNumber(n / 1e9, 1)}G`;
  if (Math.abs(n) >= 1e6) return `${fmtNumber(n / 1e6, 1)}M`;
  if (Math.abs(n) >= 1e3) return `${fmtNumber(n / 1e3, 1)}k`;
  return fmtNumber(n, 2);
}

function figure(caption, svg, summary, dataTable, legend) {
  const captionId = nextId("cap");
  const descId = nextId("desc");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-labelledby", `${captionId} ${descId}`);
  svg.prepend(s("desc", { id: descId }, summary));
  return h("figure", { class: "panel chart-figure" },
    h("figcaption", { id: captionId }, caption),
    svg,
    legend || null,
    h("p", { class: "visually-hidden" }, summary),
    h("details", {}, h("summary", {}, "Show the numbers"), dataTable));
}

function legendFor(series) {
  return h("div", { class: "legend", "aria-hidden": "true" }, series.map((name, i) => h("span", { class: `s${i}` }, name)));
}

function yAxis(svg, { left, top, plotH, plotW, max, format = compact }) {
  for (let i = 0; i <= 4; i += 1) {
    const y = top + plotH - (plotH * i) / 4;
    svg.append(s("line", { class: "grid", x1: left, x2: left + plotW, y1: y, y2: y }));
    svg.append(s("text", { x: left - 6, y: y + 4, "text-anchor": "end" }, format((max * i) / 4)));
  }
  svg.append(s("line", { class: "axis", x1: left, x2: left, y1: top, y2: top + plotH }));
  svg.append(s("line", { class: "axis", x1: left, x2: left + plotW, y1: top + plotH, y2: top + plotH }));
}

/** Stacked columns over time: points = [{label, values: [..]}], one value per series. */
export function stackedColumns({ caption, points, series, unit = "tokens", empty = "No usage in this range yet." }) {
  const width = 480;
  const height = 260;
  const left = 56;
  const top = 12;
  const plotW = width - left - 12;
  const plotH = height - top - 44;
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "xMidYMid meet" });
  const totals = points.map((p) => p.values.reduce((a, b) => a + b, 0));
  const max = niceMax(Math.max(0, ...totals));
  yAxis(svg, { left, top, plotH, plotW, max });
  if (!points.length) svg.append(s("text", { x: left + plotW / 2, y: top + plotH / 2, "text-anchor": "middle" }, empty));
  const slot = plotW / Math.max(points.length, 1);
  const barW = Math.max(2, Math.min(40, slot * 0.7));
  const labelEvery = Math.ceil(points.length / 8);
  points.forEach((p, i) => {
    let y = top + plotH;
    const x = left + i * slot + (slot - barW) / 2;
    p.values.forEach((v, j) => {
      const barH = (plotH * v) / max;
      y -= barH;
      svg.append(s("rect", { x, y, width: barW, height: Math.max(0, barH), fill: COLOURS[j % COLOURS.length] }, s("title", {}, `${p.label}: ${series[j]} ${fmtNumber(v)} ${unit}`)));
    });
    if (i % labelEvery === 0) svg.append(s("text", { x: x + barW / 2, y: top + plotH + 16, "text-anchor": "middle" }, p.label));
  });
  const total = totals.reduce((a, b) => a + b, 0);
  const summary = points.length ? `${fmtNumber(total)} ${unit} over ${points.length} intervals; the busiest had ${fmtNumber(Math.max(...totals))}.` : empty;
  const data = table([["Interval", (p) => p.label], ...series.map((name, j) => [name, (p) => fmtNumber(p.values[j])]), ["Total", (p) => fmtNumber(p.values.reduce((a, b) => a + b, 0))]], points, { empty });
  return figure(caption, svg, summary, data, legendFor(series));
}

/** Horizontal bars, largest first: items = [{label, value}]. */
export function horizontalBars({ caption, items, unit = "tokens", format = (v) => fmtNumber(v), empty = "No usage in this range yet." }) {
  const sorted = [...items].sort((a, b) => b.value - a.value).slice(0, 12);
  const width = 480;
  const rowH = 26;
  const left = 150;
  const height = Math.max(60, sorted.length * rowH + 30);
  const plotW = width - left - 60;
  const max = niceMax(Math.max(0, ...sorted.map((i) => i.value)));
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}` });
  if (!sorted.length) svg.append(s("text", { x: width / 2, y: 34, "text-anchor": "middle" }, empty));
  sorted.forEach((item, i) => {
    const y = 10 + i * rowH;
    const w = (plotW * item.value) / max;
    const label = item.label.length > 22 ? `…${item.label.slice(-21)}` : item.label;
    svg.append(
      s("text", { x: left - 8, y: y + 15, "text-anchor": "end" }, label, s("title", {}, item.label)),
      s("rect", { x: left, y, width: Math.max(1, w), height: rowH - 8, fill: COLOURS[0], rx: 2 }, s("title", {}, `${item.label}: ${format(item.value)} ${unit}`)),
      s("text", { x: left + w + 6, y: y + 15 }, format(item.value)),
    );
  });
  const summary = sorted.length ? `Largest: ${sorted[0].label} with ${format(sorted[0].value)} ${unit}; ${sorted.length} shown.` : empty;
  const data = table([["Name", (i) => i.label], [unit, (i) => format(i.value)]], sorted, { empty });
  return figure(caption, svg, summary, data);
}

/** Grouped columns: groups = [{label, values: [..]}] (e.g. TTFT p50 and p95 per model). */
export function groupedColumns({ caption, groups, series, unit = "ms", empty = "No calls measured yet." }) {
  const width = 480;
  const height = 260;
  const left = 56;
  const top = 12;
  const plotW = width - left - 12;
  const plotH = height - top - 44;
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}` });
  const all = groups.flatMap((g) => g.values.filter((v) => v !== null && v !== undefined));
  const max = niceMax(Math.max(0, ...all));
  yAxis(svg, { left, top, plotH, plotW, max, format: (v) => `${compact(v)}` });
  if (!groups.length) svg.append(s("text", { x: left + plotW / 2, y: top + plotH / 2, "text-anchor": "middle" }, empty));
  const slot = plotW / Math.max(groups.length, 1);
  const barW = Math.min(36, (slot * 0.8) / series.length);
  groups.forEach((g, i) => {
    const x0 = left + i * slot + (slot - barW * series.length) / 2;
    g.values.forEach((v, j) => {
      if (v === null || v === undefined) return;
      const barH = (plotH * v) / max;
      svg.append(s("rect", { x: x0 + j * barW, y: top + plotH - barH, width: barW - 2, height: barH, fill: COLOURS[j % COLOURS.length] }, s("title", {}, `${g.label}: ${series[j]} ${fmtNumber(v, 1)} ${unit}`)));
    });
    const label = g.label.length > 18 ? `${g.label.slice(0, 17)}…` : g.label;
    svg.append(s("text", { x: left + i * slot + slot / 2, y: top + plotH + 16, "text-anchor": "middle" }, label));
  });
  const summary = groups.length ? groups.map((g) => `${g.label}: ${series.map((name, j) => `${name} ${g.values[j] == null ? "n/a" : `${fmtNumber(g.values[j], 1)} ${unit}`}`).join(", ")}`).join("; ") : empty;
  const data = table([["Name", (g) => g.label], ...series.map((name, j) => [name, (g) => (g.values[j] == null ? "—" : `${fmtNumber(g.values[j], 1)} ${unit}`)])], groups, { empty });
  return figure(caption, svg, summary, data, legendFor(series));
}

function arc(cx, cy, r, from, to) {
  // Angles in [0, 1] along the upper half circle, left to right.
  const a0 = Math.PI * (1 - from);
  const a1 = Math.PI * (1 - to);
  const x0 = cx + r * Math.cos(a0);
  const y0 = cy - r * Math.sin(a0);
  const x1 = cx + r * Math.cos(a1);
  const y1 = cy - r * Math.sin(a1);
  return `M ${x0.toFixed(2)} ${y0.toFixed(2)} A ${r} ${r} 0 0 1 ${x1.toFixed(2)} ${y1.toFixed(2)}`;
}

/** A quota gauge: used of limit, with a tick at the soft threshold (where warnings start). */
export function gauge({ caption, used, limit, soft, status }) {
  const width = 220;
  const height = 140;
  const cx = 110;
  const cy = 110;
  const r = 80;
  const fraction = limit > 0 ? Math.min(1, used / limit) : 0;
  const colour = status === "exceeded" || fraction >= 1 ? "#b91c1c" : status === "warning" || fraction >= soft ? "#b45309" : "#15803d";
  const svg = s("svg", { class: "chart gauge", viewBox: `0 0 ${width} ${height}` });
  svg.append(s("path", { d: arc(cx, cy, r, 0, 1), stroke: "#e5e7eb", "stroke-width": 18, fill: "none" }));
  if (fraction > 0) svg.append(s("path", { d: arc(cx, cy, r, 0, Math.max(fraction, 0.005)), stroke: colour, "stroke-width": 18, fill: "none" }));
  const ta = Math.PI * (1 - soft);
  svg.append(
    s("line", { x1: cx + (r - 14) * Math.cos(ta), y1: cy - (r - 14) * Math.sin(ta), x2: cx + (r + 14) * Math.cos(ta), y2: cy - (r + 14) * Math.sin(ta), stroke: "#111827", "stroke-width": 3 }, s("title", {}, `soft threshold ${Math.round(soft * 100)} %`)),
    s("text", { x: cx + (r + 20) * Math.cos(ta), y: cy - (r + 20) * Math.sin(ta), "text-anchor": "middle" }, `${Math.round(soft * 100)}%`),
    s("text", { x: cx, y: cy - 18, "text-anchor": "middle", "font-size": 22, "font-weight": 700 }, `${Math.round((limit > 0 ? used / limit : 0) * 100)}%`),
    s("text", { x: cx, y: cy, "text-anchor": "middle" }, `${compact(used)} of ${compact(limit)}`),
  );
  const summary = `${fmtNumber(used)} of ${fmtNumber(limit)} tokens used (${Math.round(fraction * 100)} %); warnings start at ${Math.round(soft * 100)} %; status ${status}.`;
  const data = table([["Used", () => fmtNumber(used)], ["Limit", () => fmtNumber(limit)], ["Soft threshold", () => `${Math.round(soft * 100)} %`], ["Status", () => status]], [{}]);
  return figure(caption, svg, summary, data);
}
