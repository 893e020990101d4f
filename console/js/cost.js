// The cost & security plan's figures, exactly as libs/common/events/approval.py computes them
// (CostSecurityPlan): gpu_hours = round(gpus × replicas × hours, 4) and
// estimated_cost = round(gpu_hours × gpu_hour_rate, 2), with Python's round (ties to even).

/** Python's round(x, digits): the exact binary value, ties to even. */
export function pyRound(value, digits) {
  if (!Number.isFinite(value)) return value;
  // toFixed(d) rounds the exact value, taking the larger candidate on an exact tie; a tie has a
  // short exact expansion ending in 5, which toFixed with more digits shows in full.
  const exact = Math.abs(value).toFixed(Math.min(100, digits + 30));
  const [whole, fraction = ""] = exact.split(".");
  const tail = fraction.slice(digits);
  if (tail[0] === "5" && /^0*$/.test(tail.slice(1))) {
    const kept = BigInt(whole + fraction.slice(0, digits));
    const rounded = kept % 2n === 0n ? kept : kept + 1n;
    const text = rounded.toString().padStart(digits + 1, "0");
    const result = Number(digits ? `${text.slice(0, -digits)}.${text.slice(-digits)}` : text);
    return value < 0 ? -result : result;
  }
  return Number(value.toFixed(digits));
}

/** {gpu_hours, estimated_cost} of a plan, or null while a figure is missing or invalid. */
export function planCost({ gpus, replicas, hours, gpu_hour_rate }) {
  const values = [gpus, replicas, hours, gpu_hour_rate].map((v) => (v === "" || v === null || v === undefined ? NaN : Number(v)));
  if (values.some((v) => !Number.isFinite(v) || v < 0)) return null;
  const [g, r, h, rate] = values;
  const gpuHours = pyRound(g * r * h, 4);
  return { gpu_hours: gpuHours, estimated_cost: pyRound(gpuHours * rate, 2) };
}
