// Role-awareness: the same decision as libs/common/auth.py `decide`, from the action table in
// /console/actions.json (a copy of ACTIONS that tests/console checks is identical). The console
// only hides what a caller may not do; every service still decides for itself.

const RANK = { viewer: 1, developer: 2, "project-admin": 3, "platform-admin": 4 };
let ACTIONS = {};

export async function loadActions() {
  const response = await fetch("/console/actions.json", { cache: "no-store", credentials: "omit" });
  ACTIONS = response.ok ? await response.json() : {};
}

export function roleIn(principal, project) {
  if (!principal) return null;
  if (principal.platform_admin) return "platform-admin";
  const roles = principal.project_roles || {};
  if (project === null || project === undefined) {
    let best = null;
    for (const role of Object.values(roles)) if (!best || RANK[role] > RANK[best]) best = role;
    return best;
  }
  return roles[project] || null;
}

/** May `principal` perform `action` in `project` (null: in any project)? */
export function can(principal, action, project = null) {
  const rule = ACTIONS[action];
  if (!rule || !principal) return false;
  const role = roleIn(principal, project);
  if (!role || RANK[role] < RANK[rule.role]) return false;
  return (principal.scopes || []).includes(rule.scope);
}
