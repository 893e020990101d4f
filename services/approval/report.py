"""The audit report for a period: what an auditor asks for, from the records approval keeps.

- the approvals decided in the period (who asked, who decided what and when, the comment, the
  lead time against the SLA) and the requests still open at its end;
- keys created, rotated and revoked; access granted and taken (entitlements, memberships);
- catalog changes (imports, approvals, deprecations, revocations);
- the audit chain's verification when the report was made, with the signed checkpoint and the
  public key that verifies it, so the report can be checked against the chain later.

As JSON (``AuditReport``), CSV (one row per fact, a ``section`` column first) or a readable HTML
document (no script, no external resource: it can be archived and opened anywhere).
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from datetime import datetime
from statistics import median
from typing import Any

from services.approval.models import AuditRecord, Request
from services.approval.schemas import (
    AuditReport,
    AuditVerification,
    ReportApproval,
    ReportChange,
    ReportSummary,
)

# Audit actions by report section (a prefix of the action name, or a service).
KEY_ACTIONS = ("key.", "platform_key.", "platform_admin.")
ACCESS_ACTIONS = ("entitlement.", "member.")
MAX_ROWS = 50_000


def approval_row(r: Request, now: datetime) -> ReportApproval:
    decided = r.decided_at
    within = decided <= r.due_at if decided is not None else now <= r.due_at
    return ReportApproval(
        request_id=r.id,
        kind=r.kind,
        project=r.project,
        subject=_subject(r),
        requester=r.requester,
        status=r.status,
        filed_at=r.created_at,
        due_at=r.due_at,
        decided_at=decided,
        decided_by=r.decided_by,
        policy=r.policy,
        comment=r.decision_comment,
        lead_time_seconds=r.lead_time_seconds,
        within_sla=within,
    )


def _subject(r: Request) -> str:
    if r.asset_name is None:
        window = r.payload.get("window")
        return f"quota {window}: {r.payload.get('token_limit')}" if window else r.kind
    version = f"@{r.asset_version}" if r.asset_version else ""
    return f"{r.asset_kind or 'asset'} {r.asset_name}{version}"


def change_row(a: AuditRecord) -> ReportChange:
    return ReportChange(
        seq=a.seq, at=a.at, actor=a.actor, action=a.action, target=a.target, project=a.project
    )


def build(
    *,
    start: datetime,
    end: datetime,
    now: datetime,
    generated_by: str,
    decided: Sequence[Request],
    open_requests: Sequence[Request],
    records: Sequence[AuditRecord],
    verification: AuditVerification,
    public_key: str,
) -> AuditReport:
    approvals = [approval_row(r, now) for r in decided]
    keys = [change_row(a) for a in records if a.action.startswith(KEY_ACTIONS)]
    access = [change_row(a) for a in records if a.action.startswith(ACCESS_ACTIONS)]
    catalog = [change_row(a) for a in records if a.service == "catalog"]
    return AuditReport(
        start=start,
        end=end,
        generated_at=now,
        generated_by=generated_by,
        summary=_summary(approvals, [approval_row(r, now) for r in open_requests]),
        approvals=approvals,
        open_requests=[approval_row(r, now) for r in open_requests],
        keys=keys,
        access=access,
        catalog=catalog,
        verification=verification,
        public_key=public_key,
        truncated=len(records) >= MAX_ROWS,
    )


def _summary(approvals: list[ReportApproval], still_open: list[ReportApproval]) -> ReportSummary:
    by_kind: dict[str, dict[str, Any]] = {}
    for a in approvals:
        counts = by_kind.setdefault(
            a.kind, {"decided": 0, "approved": 0, "rejected": 0, "expired": 0, "withdrawn": 0}
        )
        counts["decided"] += 1
        counts[a.status] = counts.get(a.status, 0) + 1
    for kind, row in by_kind.items():
        leads = [a.lead_time_seconds for a in approvals if a.kind == kind and a.lead_time_seconds]
        row["lead_time_median_seconds"] = median(leads) if leads else None
        row["within_sla"] = sum(1 for a in approvals if a.kind == kind and a.within_sla)
    return ReportSummary(
        decided=len(approvals),
        within_sla=sum(1 for a in approvals if a.within_sla),
        open=len(still_open),
        open_overdue=sum(1 for a in still_open if not a.within_sla),
        by_kind=by_kind,
    )


# -- renderings ---------------------------------------------------------------------------------

_CSV_COLUMNS = (
    "section",
    "at",
    "actor",
    "action",
    "project",
    "target",
    "status",
    "due_at",
    "lead_time_seconds",
    "within_sla",
    "comment",
)


def to_csv(report: AuditReport) -> str:
    """One row per fact; a ``verification`` row last says whether the chain held."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(_CSV_COLUMNS)
    for a in [*report.approvals, *report.open_requests]:
        writer.writerow(
            (
                "approval",
                _iso(a.decided_at or a.filed_at),
                a.decided_by or a.requester,
                f"{a.kind} request {a.request_id}: {a.subject}",
                a.project,
                a.request_id,
                a.status,
                _iso(a.due_at),
                "" if a.lead_time_seconds is None else f"{a.lead_time_seconds:.0f}",
                "yes" if a.within_sla else "no",
                a.comment,
            )
        )
    for section, rows in (("key", report.keys), ("access", report.access)):
        for c in rows:
            writer.writerow((section, _iso(c.at), c.actor, c.action, c.project or "", c.target))
    for c in report.catalog:
        writer.writerow(("catalog", _iso(c.at), c.actor, c.action, c.project or "", c.target))
    v = report.verification
    writer.writerow(
        (
            "verification",
            _iso(report.generated_at),
            report.generated_by,
            "chain verified" if v.ok else "CHAIN BROKEN",
            "",
            f"seq {v.head_seq} {v.head_hash}",
            "ok" if v.ok else "failed",
        )
    )
    return out.getvalue()


def to_html(report: AuditReport) -> str:
    """A self-contained document: inline style, every value escaped."""
    e = html.escape
    v = report.verification
    cp = v.checkpoint
    s = report.summary
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>Steward audit report {e(_day(report.start))} to {e(_day(report.end))}</title>",
        "<style>body{font:14px/1.45 system-ui,sans-serif;margin:2rem;color:#111}"
        "table{border-collapse:collapse;width:100%;margin:.5rem 0 1.5rem}"
        "th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}"
        "th{background:#f2f2f2}.ok{color:#0a6b2d}.bad{color:#a40000;font-weight:bold}"
        "code{font-size:12px;word-break:break-all}</style></head><body>",
        "<h1>Steward audit report</h1>",
        f"<p>Period <b>{e(_iso(report.start))}</b> to <b>{e(_iso(report.end))}</b> (UTC). "
        f"Made {e(_iso(report.generated_at))} by {e(report.generated_by)}.</p>",
        "<h2>Audit chain</h2>",
        f"<p class='{'ok' if v.ok else 'bad'}'>"
        f"{'Verified: no record edited, deleted, reordered or cut' if v.ok else 'BROKEN'}"
        f" ({v.records} records, head {v.head_seq} <code>{e(v.head_hash)}</code>).</p>",
    ]
    if v.problems:
        parts.append(
            _table(
                ["record", "problem", "detail"], [(p.seq, p.problem, p.detail) for p in v.problems]
            )
        )
    if cp is not None:
        parts.append(
            f"<p>Signed checkpoint: record {cp.seq}, hash <code>{e(cp.hash)}</code>, at "
            f"{e(cp.at)}, signature <code>{e(cp.signature)}</code>; Ed25519 public key "
            f"<code>{e(report.public_key)}</code>.</p>"
        )
    parts += [
        "<h2>Approvals</h2>",
        f"<p>{s.decided} decided in the period, {s.within_sla} within their SLA; {s.open} still "
        f"open at its end, {s.open_overdue} of them overdue.</p>",
        _table(
            [
                "kind",
                "decided",
                "approved",
                "rejected",
                "expired",
                "within SLA",
                "median lead time",
            ],
            [
                (
                    kind,
                    row["decided"],
                    row.get("approved", 0),
                    row.get("rejected", 0),
                    row.get("expired", 0),
                    row["within_sla"],
                    _duration(row["lead_time_median_seconds"]),
                )
                for kind, row in sorted(s.by_kind.items())
            ],
        ),
        _approvals(report.approvals),
    ]
    if report.open_requests:
        parts += [
            "<h2>Requests open at the end of the period</h2>",
            _approvals(report.open_requests),
        ]
    for title, rows in (
        ("API keys", report.keys),
        ("Access (entitlements and members)", report.access),
        ("Catalog changes", report.catalog),
    ):
        parts += [
            f"<h2>{e(title)}</h2>",
            _table(
                ["at", "who", "action", "project", "target"],
                [(_iso(c.at), c.actor, c.action, c.project or "", c.target) for c in rows],
            ),
        ]
    if report.truncated:
        parts.append(f"<p class='bad'>Only the first {MAX_ROWS} audit records are listed.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _approvals(rows: Sequence[ReportApproval]) -> str:
    return _table(
        [
            "request",
            "what",
            "project",
            "asked by",
            "status",
            "decided by",
            "decided",
            "due",
            "lead time",
            "SLA",
            "comment",
        ],
        [
            (
                a.request_id,
                a.subject,
                a.project,
                a.requester,
                a.status,
                a.decided_by or "",
                _iso(a.decided_at),
                _iso(a.due_at),
                _duration(a.lead_time_seconds),
                "met" if a.within_sla else "missed",
                a.comment,
            )
            for a in rows
        ],
    )


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    if not rows:
        return "<p><i>None.</i></p>"
    e = html.escape
    cells = "".join(
        "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return (
        "<table><thead><tr>"
        + "".join(f"<th>{e(h)}</th>" for h in head)
        + f"</tr></thead><tbody>{cells}</tbody></table>"
    )


def _iso(t: datetime | None) -> str:
    return "" if t is None else t.isoformat(timespec="seconds").replace("+00:00", "Z")


def _day(t: datetime) -> str:
    return t.date().isoformat()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
