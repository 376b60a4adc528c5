// console.js: the release console. Admin key login, one table of soft-prompt versions per
// department with the actions their states allow (each confirmed with a reason in a dialog),
// version details with a loss chart drawn in SVG, and the audit trail. All text is shown as text.
import {
  ApiError, append, apiJson, clear, closeSession, describeError, el, fmtNumber, fmtSigned, getSession,
  setText, showOnly, submitKey, svgEl,
} from "./common.js";

const $ = (id) => document.getElementById(id);
const ui = {
  loading: $("admin-loading"), loginView: $("admin-login-view"), adminView: $("admin-view"),
  keyForm: $("admin-key-form"), keyInput: $("admin-key-input"), keySubmit: $("admin-key-submit"),
  keyError: $("admin-key-error"), adminName: $("admin-name"), logout: $("admin-logout"),
  error: $("console-error"), status: $("console-status"), refresh: $("refresh"), departments: $("departments"),
  details: $("version-details"), detailsTitle: $("details-title"), detailsBody: $("details-body"),
  detailsClose: $("details-close"), auditBody: $("audit-body"),
  dialog: $("action-dialog"), actionForm: $("action-form"), actionTitle: $("action-title"),
  actionSummary: $("action-summary"), actionWarning: $("action-warning"), reason: $("reason"),
  forceRow: $("force-row"), force: $("force"), actionError: $("action-error"),
  confirm: $("action-confirm"), cancel: $("action-cancel"),
};
const VIEWS = [ui.loading, ui.loginView, ui.adminView];
const MSG_EXPIRED = "Your admin session expired — enter the admin key again.";

const ACTIONS = {
  approve: { label: "Approve", done: "Approved", versioned: true,
    summary: (d, v) => `Approve ${v} of ${d}, so that it can be activated.` },
  activate: { label: "Activate", done: "Activated", versioned: true,
    summary: (d, v) => `Make ${v} the active soft prompt of ${d}. Chats use it from the next request.` },
  rollback: { label: "Roll back", done: "Rolled back", versioned: false,
    summary: (d) => `Go back to the version of ${d} that was active before the current one.` },
  deactivate: { label: "Deactivate", done: "Deactivated", versioned: false,
    summary: (d) => `Stop using a soft prompt for ${d}: chats answer with no soft prompt.` },
};

const state = {
  csrf: null,
  departments: [], // the last listing
  pending: null, // {action, dept, version, opener} while the dialog is open
  details: null, // {dept, version} shown in the details panel
};

// ------------------------------------------------------------------------------- session

async function boot() {
  ui.keyForm.addEventListener("submit", onKeySubmit);
  ui.logout.addEventListener("click", onLogout);
  ui.refresh.addEventListener("click", () => loadAll());
  ui.departments.addEventListener("click", onDepartmentsClick);
  ui.detailsClose.addEventListener("click", closeDetails);
  ui.actionForm.addEventListener("submit", onConfirm);
  ui.cancel.addEventListener("click", () => ui.dialog.close());
  ui.dialog.addEventListener("close", onDialogClosed);
  try {
    const session = await getSession("admin");
    if (session) return enter(session);
  } catch (e) {
    setText(ui.keyError, describeError(e));
  }
  showLogin();
}

function showLogin(message) {
  state.csrf = null;
  ui.logout.hidden = true;
  ui.adminName.hidden = true;
  if (ui.dialog.open) ui.dialog.close();
  if (message) setText(ui.keyError, message);
  showOnly(VIEWS, ui.loginView);
  ui.keyInput.focus();
}

function enter(session) {
  state.csrf = session.csrf;
  setText(ui.adminName, session.admin ? `Signed in as ${session.admin}` : "Signed in");
  ui.adminName.hidden = false;
  ui.logout.hidden = false;
  setText(ui.keyError, "");
  showOnly(VIEWS, ui.adminView);
  loadAll();
}

function onKeySubmit(event) {
  const form = { input: ui.keyInput, submit: ui.keySubmit, error: ui.keyError };
  return submitKey(event, "admin", form, "Enter your admin key.", enter);
}

async function onLogout() {
  try {
    await closeSession("admin", state.csrf);
  } catch (e) {
    setText(ui.error, describeError(e));
    return;
  }
  state.departments = [];
  clear(ui.departments);
  clear(ui.auditBody);
  closeDetails();
  setText(ui.error, "");
  setText(ui.status, "");
  showLogin();
}

/** An error loading data: 401 goes back to the key form, anything else is shown on the page. */
function showLoadError(e) {
  if (e instanceof ApiError && e.status === 401) showLogin(MSG_EXPIRED);
  else setText(ui.error, describeError(e));
}

function enc(part) {
  return encodeURIComponent(part);
}

// ---------------------------------------------------------------------------- loading data

async function loadAll() {
  setText(ui.error, "");
  await Promise.all([loadDepartments(), loadAudit()]);
}

async function loadDepartments() {
  try {
    const body = await apiJson("/admin/v1/departments", { csrf: state.csrf });
    state.departments = Array.isArray(body && body.departments) ? body.departments : [];
    renderDepartments(state.departments);
  } catch (e) {
    showLoadError(e);
  }
}

async function loadAudit() {
  try {
    const body = await apiJson("/admin/v1/audit?last=50", { csrf: state.csrf });
    renderAudit(Array.isArray(body && body.records) ? body.records : []);
  } catch (e) {
    showLoadError(e);
  }
}

// ----------------------------------------------------------------------------- departments

// A reload updates the department sections and version rows in place (same elements, new
// contents), so focus and anything holding a row (such as a browser test) stay valid.
function renderDepartments(departments) {
  if (departments.length === 0) {
    ui.departments.replaceChildren(el("p", { class: "empty", text: "No soft prompts registered." }));
    return;
  }
  const previous = new Map();
  for (const s of ui.departments.querySelectorAll("section[data-dept]")) previous.set(s.dataset.dept, s);
  ui.departments.replaceChildren(...departments.map((d, i) => departmentSection(d, i, previous.get(d.department))));
}

function departmentSection(d, index, section = el("section", { class: "dept card", "data-dept": d.department })) {
  const headingId = `dept-heading-${index}`;
  const versions = Array.isArray(d.versions) ? d.versions : [];
  const rows = new Map();
  for (const r of section.querySelectorAll("tr[data-version]")) rows.set(r.dataset.version, r);
  const head = el("div", { class: "section-head" },
    el("h3", { id: headingId, text: d.department }),
    el("p", { class: "muted dept-active", text: d.active ? `active: ${d.active}` : "no active version" }));
  if (d.active) {
    head.append(el("div", { class: "actions" },
      actionButton("rollback", d.department, null, "Roll back"),
      actionButton("deactivate", d.department, null, "Deactivate")));
  }
  section.setAttribute("aria-labelledby", headingId);
  section.replaceChildren(head, versions.length === 0
    ? el("p", { class: "empty", text: "No soft prompts registered." })
    : versionsTable(d, versions, rows));
  return section;
}

const VERSION_COLUMNS = ["Version", "State", "Depth", "Tokens", "Size (KB)", "Dev verdict", "Created", "Author", "Actions"];
const AUDIT_COLUMNS = ["Time", "Department", "Version", "Action", "Actor", "Reason"];

/** Name each cell after its column: narrow screens show the rows as stacked "label value" lines. */
function labelCells(row, columns) {
  [...row.children].forEach((cell, i) => cell.setAttribute("data-label", columns[i] ?? ""));
  return row;
}

function versionsTable(d, versions, rows) {
  const table = el("table", { class: "data versions stack-narrow" },
    el("thead", {}, el("tr", {}, VERSION_COLUMNS.map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, versions.map((v) => versionRow(d, v, rows.get(v.version)))));
  return el("div", { class: "table-wrap" }, table);
}

function versionRow(d, v, row = el("tr", { "data-version": v.version })) {
  const isActive = v.state === "active" || v.version === d.active;
  const actions = el("td", { class: "row-actions" });
  if (v.state === "draft") actions.append(actionButton("approve", d.department, v.version, "Approve"));
  if (v.state === "approved" && !isActive) actions.append(actionButton("activate", d.department, v.version, "Activate"));
  row.classList.toggle("is-active", isActive);
  row.replaceChildren(
    el("td", {}, el("button", {
      type: "button", class: "version-details link", "data-dept": d.department, "data-version": v.version,
      "aria-label": `${v.version} details`, text: v.version,
    })),
    el("td", {}, el("span", { class: `badge state-${slug(v.state)}`, text: v.state ?? "unknown" })),
    el("td", { class: "num", text: v.depth ?? "—" }),
    el("td", { class: "num", text: v.n_tokens ?? "—" }),
    el("td", { class: "num", text: Number.isFinite(v.bytes) ? (v.bytes / 1024).toFixed(1) : "—" }),
    el("td", {}, verdictBadge(v.dev_verdict)),
    el("td", { class: "nowrap", text: v.created ?? "—" }),
    el("td", { text: v.author ?? "—" }),
    actions);
  return labelCells(row, VERSION_COLUMNS);
}

function actionButton(action, dept, version, label) {
  return el("button", {
    type: "button", class: action === "deactivate" || action === "rollback" ? "secondary" : null,
    "data-action": action, "data-dept": dept, "data-version": version, text: label,
  });
}

function verdictBadge(verdict) {
  if (!verdict) return el("span", { class: "muted", text: "not evaluated" });
  return el("span", { class: `verdict verdict-${slug(verdict.verdict)}` }, verdictText(verdict));
}

/** "better +4.1 [1.0, 7.2] · n=90 · step 60" */
function verdictText(v) {
  const parts = [`${v.verdict ?? "unknown"} ${fmtSigned(v.delta)} [${fmtNumber(v.low)}, ${fmtNumber(v.high)}]`];
  if (v.n !== undefined && v.n !== null) parts.push(`n=${v.n}`);
  if (v.step !== undefined && v.step !== null) parts.push(`step ${v.step}`);
  return parts.join(" · ");
}

function slug(text) {
  return String(text ?? "unknown").toLowerCase().replace(/[^a-z0-9]+/g, "-");
}

function findVersion(dept, version) {
  const d = state.departments.find((x) => x.department === dept);
  return d && Array.isArray(d.versions) ? d.versions.find((v) => v.version === version) : undefined;
}

function onDepartmentsClick(event) {
  const button = event.target.closest("button");
  if (!button || !ui.departments.contains(button)) return;
  const { dept, version, action } = button.dataset;
  if (button.classList.contains("version-details")) showDetails(dept, version);
  else if (action && ACTIONS[action]) openAction(action, dept, version || null, button);
}

// ---------------------------------------------------------------------------- action dialog

function openAction(action, dept, version, opener) {
  const spec = ACTIONS[action];
  const verdict = version ? (findVersion(dept, version) || {}).dev_verdict : null;
  const worse = action === "approve" && verdict && verdict.verdict === "worse";
  state.pending = { action, dept, version, opener };
  setText(ui.actionTitle, version ? `${spec.label} ${dept} ${version}` : `${spec.label} ${dept}`);
  setText(ui.actionSummary, spec.summary(dept, version));
  setText(ui.actionWarning, worse
    ? `Its dev verdict is worse than no soft prompt (${verdictText(verdict)}). The gate refuses it unless you force it.`
    : "");
  ui.actionWarning.hidden = !worse;
  ui.forceRow.hidden = !worse;
  ui.force.checked = false;
  ui.reason.value = "";
  setText(ui.actionError, "");
  ui.confirm.textContent = spec.label;
  ui.confirm.disabled = false;
  ui.dialog.showModal();
  ui.reason.focus();
}

function onDialogClosed() {
  const pending = state.pending;
  state.pending = null;
  if (pending && pending.opener && document.contains(pending.opener)) pending.opener.focus();
}

async function onConfirm(event) {
  event.preventDefault();
  const pending = state.pending;
  if (!pending) return;
  const reason = ui.reason.value.trim();
  if (!reason) {
    setText(ui.actionError, "Give a reason: it is recorded in the audit trail.");
    ui.reason.focus();
    return;
  }
  const { action, dept, version } = pending;
  const body = action === "approve" ? { reason, force: !ui.forceRow.hidden && ui.force.checked } : { reason };
  setText(ui.actionError, "");
  ui.confirm.disabled = true;
  try {
    await apiJson(actionPath(action, dept, version), { method: "POST", body, csrf: state.csrf });
  } catch (e) {
    setText(ui.actionError, describeError(e));
    ui.confirm.disabled = false;
    return;
  }
  pending.opener = null; // the table is redrawn: focus goes back to the page
  ui.dialog.close();
  setText(ui.status, `${ACTIONS[action].done} ${dept}${version ? ` ${version}` : ""}.`);
  await loadAll();
  if (state.details && state.details.dept === dept) showDetails(state.details.dept, state.details.version, false);
}

function actionPath(action, dept, version) {
  const base = `/admin/v1/departments/${enc(dept)}`;
  return ACTIONS[action].versioned ? `${base}/versions/${enc(version)}/${action}` : `${base}/${action}`;
}

// -------------------------------------------------------------------------- version details

async function showDetails(dept, version, moveFocus = true) {
  const wanted = { dept, version };
  state.details = wanted;
  setText(ui.detailsTitle, `${dept} ${version}`);
  clear(ui.detailsBody);
  ui.detailsBody.append(el("p", { class: "muted", text: "Loading…" }));
  ui.details.hidden = false;
  if (moveFocus) ui.detailsTitle.focus();
  let body;
  try {
    body = await apiJson(`/admin/v1/departments/${enc(dept)}/versions/${enc(version)}`, { csrf: state.csrf });
  } catch (e) {
    if (state.details !== wanted) return;
    clear(ui.detailsBody);
    if (e instanceof ApiError && e.status === 401) showLogin(MSG_EXPIRED);
    else ui.detailsBody.append(el("p", { class: "error", role: "alert", text: describeError(e) }));
    return;
  }
  if (state.details !== wanted) return; // another version was clicked meanwhile
  clear(ui.detailsBody);
  renderDetails(body || {});
}

function closeDetails() {
  state.details = null;
  ui.details.hidden = true;
  clear(ui.detailsBody);
}

function renderDetails(v) {
  const size = Number.isFinite(v.bytes) ? `${(v.bytes / 1024).toFixed(1)} KB` : null;
  const summary = {
    state: v.state, depth: v.depth, tokens: v.n_tokens, size, created: v.created, author: v.author,
    "dev verdict": v.dev_verdict ? verdictText(v.dev_verdict) : "not evaluated",
  };
  append(ui.detailsBody,
    el("div", { class: "details-grid" },
      block("Summary", definitionList(summary, "summary")),
      block("Input contract", definitionList(v.contract, "contract")),
      block("Hyperparameters", definitionList(v.hyperparameters, "hyperparameters")),
      v.metrics ? block("Metrics", definitionList(v.metrics, "metrics")) : null),
    block("Evaluations", evalsTable(Array.isArray(v.evals) ? v.evals : [])),
    block("Loss curve", lossChart(Array.isArray(v.loss_curve) ? v.loss_curve : [])));
}

function block(title, content) {
  return el("div", { class: "block" }, el("h3", { text: title }), content);
}

function definitionList(obj, id) {
  const entries = obj && typeof obj === "object" ? Object.entries(obj) : [];
  if (entries.length === 0) return el("p", { class: "muted", id, text: "None recorded." });
  const dl = el("dl", { class: "kv", id });
  for (const [key, value] of entries) dl.append(el("dt", { text: key }), el("dd", { text: displayValue(value) }));
  return dl;
}

function displayValue(value) {
  if (value === null || value === undefined) return "none";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function evalsTable(evals) {
  if (evals.length === 0) return el("p", { class: "muted", id: "evals", text: "No evaluations recorded." });
  const rows = evals.map((e) => {
    const vs = e.vs_none;
    const vsText = vs ? `${fmtSigned(vs.delta)} [${fmtNumber(vs.low)}, ${fmtNumber(vs.high)}]${vs.n ? ` · n=${vs.n}` : ""}` : "—";
    return el("tr", {},
      el("td", { class: "num", text: e.step ?? "—" }),
      el("td", { class: "num", text: fmtNumber(e.f1) }),
      el("td", { class: "num", text: fmtNumber(e.em) }),
      el("td", { text: vsText }));
  });
  const head = ["Step", "F1", "EM", "F1 vs no prompt (Δ [interval])"]
    .map((h, i) => el("th", { scope: "col", class: i < 3 ? "num" : null, text: h }));
  return el("div", { class: "table-wrap" },
    el("table", { class: "data", id: "evals" }, el("thead", {}, el("tr", {}, head)), el("tbody", {}, rows)));
}

// ------------------------------------------------------------------------------ loss chart

const CHART = { width: 560, height: 260, left: 60, right: 16, top: 14, bottom: 46, ticks: 5 };

function lossChart(curve) {
  const points = curve.filter((p) => p && Number.isFinite(p.step) && Number.isFinite(p.loss));
  if (points.length === 0) return el("p", { class: "muted", id: "loss-chart-empty", text: "No loss curve recorded." });
  const x = axisRange(points.map((p) => p.step), 1);
  const y = axisRange(points.map((p) => p.loss), 0.5);
  const plotW = CHART.width - CHART.left - CHART.right;
  const plotH = CHART.height - CHART.top - CHART.bottom;
  const sx = (v) => CHART.left + ((v - x.min) / (x.max - x.min)) * plotW;
  const sy = (v) => CHART.top + plotH - ((v - y.min) / (y.max - y.min)) * plotH;
  const first = points[0];
  const last = points[points.length - 1];
  const svg = svgEl("svg", {
    id: "loss-chart", class: "chart", viewBox: `0 0 ${CHART.width} ${CHART.height}`, role: "img",
    "aria-labelledby": "loss-chart-title", "data-points": points.length,
  }, svgEl("title", { id: "loss-chart-title",
    text: `Training loss over ${points.length} points: ${fmtNumber(first.loss, 3)} at step ${first.step}, `
      + `${fmtNumber(last.loss, 3)} at step ${last.step}` }));
  svg.append(...gridAndTicks(x, y, sx, sy), ...axes(), ...curveShape(points, sx, sy));
  return el("figure", { class: "chart-wrap" }, svg);
}

/** min/max of `values`, widened by `pad` when they are all equal. */
function axisRange(values, pad) {
  let min = Infinity;
  let max = -Infinity;
  for (const v of values) {
    if (v < min) min = v;
    if (v > max) max = v;
  }
  if (min === max) return { min: min - pad, max: max + pad };
  return { min, max };
}

function gridAndTicks(x, y, sx, sy) {
  const out = [];
  const bottom = CHART.height - CHART.bottom;
  for (let i = 0; i < CHART.ticks; i += 1) {
    const f = i / (CHART.ticks - 1);
    const xv = x.min + f * (x.max - x.min);
    const yv = y.min + f * (y.max - y.min);
    out.push(svgEl("line", { class: "grid", x1: CHART.left, x2: CHART.width - CHART.right, y1: sy(yv), y2: sy(yv) }));
    out.push(svgEl("text", { class: "tick", x: CHART.left - 6, y: sy(yv) + 4, "text-anchor": "end", text: tickLabel(yv, y) }));
    out.push(svgEl("line", { class: "tick-mark", x1: sx(xv), x2: sx(xv), y1: bottom, y2: bottom + 5 }));
    out.push(svgEl("text", { class: "tick", x: sx(xv), y: bottom + 18, "text-anchor": "middle", text: tickLabel(xv, x, true) }));
  }
  return out;
}

function tickLabel(value, range, integer = false) {
  if (integer && range.max - range.min >= 4) return String(Math.round(value));
  const span = Math.abs(range.max - range.min);
  const digits = span >= 10 ? 1 : span >= 1 ? 2 : 3;
  return value.toFixed(digits);
}

function axes() {
  const bottom = CHART.height - CHART.bottom;
  const right = CHART.width - CHART.right;
  return [
    svgEl("line", { class: "axis", x1: CHART.left, x2: right, y1: bottom, y2: bottom }),
    svgEl("line", { class: "axis", x1: CHART.left, x2: CHART.left, y1: CHART.top, y2: bottom }),
    svgEl("text", { class: "axis-label", x: CHART.left + (right - CHART.left) / 2, y: CHART.height - 8,
      "text-anchor": "middle", text: "step" }),
    svgEl("text", { class: "axis-label", x: -(CHART.top + (bottom - CHART.top) / 2), y: 16,
      transform: "rotate(-90)", "text-anchor": "middle", text: "loss" }),
  ];
}

function curveShape(points, sx, sy) {
  if (points.length === 1) {
    return [svgEl("circle", { class: "loss-point", cx: sx(points[0].step), cy: sy(points[0].loss), r: 3 })];
  }
  const coords = points.map((p) => `${sx(p.step).toFixed(1)},${sy(p.loss).toFixed(1)}`).join(" ");
  return [svgEl("polyline", { class: "loss-line", points: coords })];
}

// -------------------------------------------------------------------------------- audit

function renderAudit(records) {
  clear(ui.auditBody);
  const rows = newestFirst(records);
  if (rows.length === 0) {
    ui.auditBody.append(el("tr", {}, el("td", { colspan: 6, class: "empty", text: "No changes recorded yet." })));
    return;
  }
  for (const r of rows) ui.auditBody.append(auditRow(r));
}

/** The server lists the trail oldest first; show it newest first whichever order it comes in. */
function newestFirst(records) {
  if (records.length < 2) return records.slice();
  const t0 = Date.parse(records[0].time);
  const t1 = Date.parse(records[records.length - 1].time);
  const ascending = Number.isNaN(t0) || Number.isNaN(t1) ? true : t0 <= t1;
  return ascending ? records.slice().reverse() : records.slice();
}

function auditRow(r) {
  const hasMove = "from" in r || "to" in r;
  const move = hasMove ? ` (${r.from ?? "none"} → ${r.to ?? "none"})` : "";
  return labelCells(el("tr", {},
    el("td", { class: "nowrap", text: r.time ?? "" }),
    el("td", { text: r.department ?? "" }),
    el("td", { text: r.version ?? "—" }),
    el("td", { text: `${r.action ?? ""}${move}` }),
    el("td", { text: r.actor ?? "" }),
    el("td", { class: "reason", text: r.reason ?? "" })), AUDIT_COLUMNS);
}

boot();
