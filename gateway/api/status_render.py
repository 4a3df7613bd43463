"""HTML for the status page: pure functions from figures to markup, every value escaped.

Key figures carry `data-figure="..."` attributes and device rows `data-device-id`, so tests (and
scrapers) read them without parsing prose.
"""

from __future__ import annotations

import functools
import html
from importlib import resources
from string import Template
from urllib.parse import urlsplit

import msgspec

from gateway.humanize import human_age, human_bytes, local_time, zoned_time
from gateway.ops.activity import ErrorEntry, MinuteCounts
from gateway.ops.errortext import KEY_HINT, explain, plain
from gateway.ops.status import DeadLetter, DeviceActivity, RecentUpload, StatusReport

REFRESH_S = 10
_STATE_CLASS = {"online": "ok", "degraded": "warn", "recovering": "warn", "offline": "bad", "unknown": "muted",
                "off": "muted", "delivered": "ok", "pending": "warn", "held": "warn", "dead": "bad"}


class PageFigures(msgspec.Struct, kw_only=True):
    report: StatusReport
    devices: list[DeviceActivity]
    uploads: list[RecentUpload]
    dead: list[DeadLetter]
    errors: list[ErrorEntry]
    minutes: list[MinuteCounts]
    now: float
    uptime_s: float
    version: str
    forwarding_on: bool
    cloud_url: str
    near_dup_saved_bytes: int = 0  # near-duplicates held or refused since start: uplink saved
    near_dup_count: int = 0  # near-duplicates found since start, whatever the action


def e(value: object) -> str:
    """Escape anything for HTML text and attribute values."""
    return html.escape("-" if value is None else str(value), quote=True)


@functools.cache
def _template() -> Template:
    text = resources.files("gateway.api").joinpath("templates/status.html").read_text(encoding="utf-8")
    return Template(text)


def _ago(now: float, then: float | None) -> str:
    if then is None:
        return "-"
    return f'<span title="{e(zoned_time(then))}">{e(human_age(max(0.0, now - then)))} ago</span>'


def _card(label: str, value: str, sub: str = "", figure: str = "", cls: str = "") -> str:
    attr = f' data-figure="{e(figure)}"' if figure else ""
    klass = f"value {cls}".strip()
    return (f'<div class="card"><div class="label">{e(label)}</div><div class="{e(klass)}"{attr}>{e(value)}</div>'
            f'<div class="sub">{sub}</div></div>')


def _table(headings: list[tuple[str, str]], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{e(empty)}</p>'
    head = "".join(f'<th class="{e(cls)}">{e(h)}</th>' for h, cls in headings)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _cloud_host(url: str) -> str:
    parts = urlsplit(url)
    return parts.hostname or url if parts.scheme else url  # never the userinfo part of a URL


def _cards(f: PageFigures) -> str:
    r = f.report
    state = r.connectivity
    if f.forwarding_on:
        delivered = _ago(f.now, r.last_success_at) if r.last_success_at is not None else "none yet"
        conn_sub = f"to {e(_cloud_host(f.cloud_url))}<br>last delivery {delivered}"
        conn_sub += _last_error(f)
    else:
        conn_sub = "forwarding off: no cloud URL set"
    oldest = human_age(r.oldest_pending_age_s)
    batches = ", ".join(f"{e(k)} {e(v)}" for k, v in sorted(r.batches.items())) or "no batches"
    held = f", {e(r.held_count)} held for key check" if r.held_count else ""
    if r.backlog_count:
        backlog_sub = (f'<span data-figure="backlog-bytes">{e(human_bytes(r.backlog_bytes))}</span>{held}<br>'
                       f'oldest <span data-figure="oldest-pending">{e(oldest)}</span><br>'
                       f'<span data-figure="eta">{e(_outlook(f))}</span>')
    else:
        backlog_sub = "nothing waiting for the cloud" if f.forwarding_on else "nothing waiting"
    return '<div class="cards">' + "".join([
        _card("Cloud", state, conn_sub, "connectivity", _STATE_CLASS.get(state, "")),
        _card("Backlog", str(r.backlog_count), backlog_sub, "backlog-count", "warn" if r.backlog_count else "ok"),
        _card("Images stored", str(r.images), f"{e(human_bytes(r.image_bytes))}<br>{batches}", "images"),
        _card("Dead letters", str(r.dead_count),
              (_dead_hint(f) if r.dead_count else f"{e(r.delivered_count)} delivered")
              + (f"<br>{e(r.key_unreadable_count)} device key unreadable: check keys.secret_file"
                 if r.key_unreadable_count else ""),
              "dead-letters", "bad" if r.dead_count else "ok"),
        _card("Uplink saved", human_bytes(f.near_dup_saved_bytes),
              f"{e(f.near_dup_count)} near-duplicate frame(s) since start<br>"
              f"{e(r.skipped_count)} held ({e(human_bytes(r.skipped_bytes))}): <code>gateway outbox retry</code> "
              "sends them", "uplink-saved"),
        _card("Disk free", human_bytes(r.disk_free_bytes),
              f'catalog <span data-figure="catalog-size">{e(human_bytes(r.catalog_bytes))}</span>'
              + (f"<br>{e(r.journal_quarantined)} journal record(s) quarantined: "
                 "<code>gateway journal quarantine list</code>" if r.journal_quarantined else ""),
              "disk-free", "bad" if r.journal_quarantined else ""),
        _card("Devices", str(r.devices), f"up {e(human_age(f.uptime_s))}, v{e(f.version)}", "devices"),
        _uplink_card(f),
    ]) + "</div>"


def _last_error(f: PageFigures) -> str:
    """The last forwarding error in words, the cloud's code first; marked resolved once a delivery
    came after it."""
    r = f.report
    said = explain(r.last_error)
    if said is None:
        return ""
    full = e(f"image {said.image_id}" if said.image_id else "")
    if r.last_success_at is not None and r.last_error_at is not None and r.last_success_at >= r.last_error_at:
        return (f'<br><span class="muted" data-figure="last-error-resolved" title="{full}">resolved: '
                f"{e(said.summary)} ({_ago(f.now, r.last_error_at)}), delivered since</span>")
    shown_below = said.key_refused and r.dead_count  # the dead letters' card says what to do
    hint = f'<br><span data-figure="last-error-hint">{_code(said.hint)}</span>' if said.hint and not shown_below else ""
    return (f'<br>last error {_ago(f.now, r.last_error_at)}: '
            f'<span class="bad" data-figure="last-error" title="{full}">{e(said.summary)}</span>{hint}')


def _code(text: str) -> str:
    """Escaped text whose `command` parts are shown as code."""
    parts = e(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _outlook(f: PageFigures) -> str:
    """When the backlog will be gone, in a sentence."""
    r = f.report
    if not f.forwarding_on:
        return "kept here: forwarding is off (no cloud URL set)"
    if r.connectivity == "offline":
        return "waiting for the cloud to come back"
    if r.eta_s is not None:
        return f"sent in about {human_age(r.eta_s)} at the recent rate"
    return "not moving: nothing delivered lately"


def _dead_hint(f: PageFigures) -> str:
    """What brings the dead letters back, by why they died."""
    causes = [explain(x.last_error) for x in f.dead]
    if any(c is not None and c.key_refused for c in causes):
        return "the cloud refused the device key: " + _code(KEY_HINT)
    if any(c is not None and c.summary.startswith("the device key stored here") for c in causes):
        return ("device key unreadable: point keys.secret_file at the right secret, "
                "then <code>gateway outbox retry</code>")
    return "fix the cause (see below), then <code>gateway outbox retry</code>"


def _said(raw: str | None) -> str:
    said = explain(raw)
    return "-" if said is None else said.summary[:200]


def _uplink_card(f: PageFigures) -> str:
    """The sending window now and the next change (docs/uplink.md)."""
    w = f.report.uplink.get("window") or {}
    cap = f"at most {human_bytes(w.get('cap_bytes_per_s'))}/s" if w.get("cap_bytes_per_s") else "no cap"
    if not w.get("configured"):
        value, sub = "any time", f"no windows configured, {e(cap)}"
    elif w.get("current"):
        value, sub = str(w["current"]), e(cap)
    else:
        value, sub = "outside windows", f"only always-classes go, {e(cap)}"
    if w.get("next_change_at"):
        sub += (f'<br><span data-figure="window-next">{e(w.get("next_change"))}</span> '
                f"at {e(local_time(w['next_change_at']))}")
    return _card("Uplink window", value, sub, "window", "" if w.get("current") or not w.get("configured") else "warn")


def _classes(f: PageFigures) -> str:
    rows = []
    for c in f.report.uplink.get("classes") or []:
        waits = c.get("waits_for")
        when = ("sending" if c["sending_now"] else
                f"waits for {e(waits['window'])} at {e(local_time(waits['at']))}" if waits else "no window sends it")
        rows.append(
            f'<tr data-class="{e(c["name"])}"><td class="name">{e(c["name"])}{" (always)" if c["always"] else ""}'
            f'</td><td class="num">{e(c["priority"])}</td><td class="num" data-figure="class-pending">'
            f'{e(c["pending_count"])}</td><td class="num wide">{e(human_bytes(c["pending_bytes"]))}</td>'
            f'<td>{e(human_age(c["oldest_pending_age_s"]))}</td><td class="{"ok" if c["sending_now"] else "warn"}">'
            f"{when}</td></tr>")
    return _table([("class", ""), ("priority", "num"), ("pending", "num"), ("bytes", "num wide"), ("oldest", ""),
                   ("now", "")], rows, "no classes")


def _throughput(minutes: list[MinuteCounts]) -> str:
    """A column chart, one pair of bars (accepted, delivered) per minute, oldest left."""
    peak = max([m.accepted for m in minutes] + [m.delivered for m in minutes] + [1])
    columns = []
    for m in minutes:
        tip = (f"{local_time(m.minute)[11:16]}: {m.accepted} accepted ({human_bytes(m.accepted_bytes)}), "
               f"{m.delivered} delivered ({human_bytes(m.delivered_bytes)})")
        columns.append(
            f'<div class="col" title="{e(tip)}"><span class="in" style="height:{100 * m.accepted // peak}%"></span>'
            f'<span class="out" style="height:{100 * m.delivered // peak}%"></span></div>'
        )
    last = minutes[-1] if minutes else MinuteCounts(minute=0)
    total_in = sum(m.accepted for m in minutes)
    total_out = sum(m.delivered for m in minutes)
    first_label = local_time(minutes[0].minute)[11:16] if minutes else ""
    return (
        f'<p class="sub"><span class="key in"></span> accepted <b data-figure="accepted-recent">{total_in}</b> '
        f"({e(human_bytes(sum(m.accepted_bytes for m in minutes)))}) &nbsp; "
        f'<span class="key out"></span> delivered <b data-figure="delivered-recent">{total_out}</b> '
        f"({e(human_bytes(sum(m.delivered_bytes for m in minutes)))}) in the last {len(minutes)} min; "
        f"this minute {e(last.accepted)} in, {e(last.delivered)} out (peak {e(peak)}/min)</p>"
        f'<div class="chart">{"".join(columns)}</div>'
        f'<div class="axis"><span>{e(first_label)}</span><span>now</span></div>'
    )


def _devices(f: PageFigures) -> str:
    rows = []
    for d in f.devices:
        state = "revoked" if d.revoked else d.status
        cls = {"approved": "ok", "pending": "warn"}.get(state, "bad")
        rows.append(
            f'<tr data-device-id="{e(d.device_id)}"><td class="name"><span class="device-name">{e(d.name)}</span>'
            f'<br><code class="muted">{e(d.device_id)}</code>{_agent(d)}</td><td class="{cls}">{e(state)}</td>'
            f'<td class="num" data-figure="device-images">{e(d.images)}</td>'
            f'<td class="num wide">{e(human_bytes(d.image_bytes))}</td>'
            f"<td>{_ago(f.now, d.last_upload_at)}</td><td class=\"wide\">{_ago(f.now, d.last_seen_at)}</td></tr>"
        )
    return _table([("device", ""), ("status", ""), ("images", "num"), ("bytes", "num wide"), ("last upload", ""),
                   ("last seen", "wide")], rows, "no devices registered: gateway devices add NAME")


def _agent(d: DeviceActivity) -> str:
    """What the device's last heartbeat said: model, LAN address, requests pending."""
    parts = [f'model <code data-figure="device-model">{e(d.model_id)}</code>' if d.model_id else "",
             f'<code data-figure="device-ip">{e(d.ip_address)}</code>' if d.ip_address else "",
             f'<span data-figure="device-pending-requests">{e(d.pending_requests)}</span> pending request(s)'
             if d.pending_requests else ""]
    shown = " · ".join(p for p in parts if p)
    return f'<br><span class="muted">{shown}</span>' if shown else ""


def _uploads(f: PageFigures) -> str:
    names = {d.device_id: d.name for d in f.devices}
    rows = [
        f'<tr><td>{_ago(f.now, u.received_at)}</td><td class="name">{e(u.filename)}</td>'
        f'<td class="wide">{e(names.get(u.device_id, u.device_id))}</td><td class="num">{e(human_bytes(u.size))}</td>'
        f'<td class="{_STATE_CLASS.get(u.state or "", "")}">{e(u.state)}</td></tr>'
        for u in f.uploads
    ]
    return _table([("received", ""), ("file", ""), ("device", "wide"), ("size", "num"), ("state", "")], rows,
                  "no uploads yet")


def _errors(f: PageFigures) -> str:
    rows = [
        f'<tr><td>{_ago(f.now, x.at)}</td><td class="bad">{e(x.status)}</td>'
        f'<td class="name"><code>{e(x.code or "-")}</code> {e(plain(x.message))}</td>'
        f'<td class="wide name">{e(x.method)} {e(x.path)}</td><td class="wide">{e(x.client)}</td>'
        f'<td class="wide"><code>{e(x.request_id)}</code></td></tr>'
        for x in f.errors
    ]
    return _table([("when", ""), ("status", ""), ("error", ""), ("request", "wide"), ("client", "wide"),
                   ("request id", "wide")], rows, "no errors since start-up")


def _dead(f: PageFigures) -> str:
    rows = [
        f'<tr><td>{_ago(f.now, x.created_at)}</td><td class="name">{e(x.filename)}<br>'
        f'<code class="muted">{e(x.image_id)}</code></td><td class="num">{e(x.last_status)}</td>'
        f'<td class="name wide">{e(_said(x.last_error))}</td><td class="num wide">{e(x.attempts)}</td></tr>'
        for x in f.dead
    ]
    return _table([("received", ""), ("image", ""), ("status", "num"), ("cloud said", "wide"),
                   ("attempts", "num wide")], rows, "no dead letters")


def render_page(f: PageFigures) -> str:
    r = f.report
    shown_dead = f" (newest {len(f.dead)})" if r.dead_count > len(f.dead) else ""
    body = "\n".join([
        _cards(f),
        "<h2>Throughput</h2>", _throughput(f.minutes),
        f"<h2>Devices ({e(len(f.devices))})</h2>", _devices(f),
        "<h2>Priority classes</h2>", _classes(f),
        "<h2>Recent uploads</h2>", _uploads(f),
        "<h2>Recent errors</h2>", _errors(f),
        f"<h2>Dead letters{e(shown_dead)}</h2>", _dead(f),
    ])
    subtitle = f"{e(zoned_time(f.now))} (gateway time), refreshes every {REFRESH_S} s"
    return _template().substitute(title="AcuSight edge gateway", subtitle=subtitle, body=body, refresh_s=REFRESH_S)


def render_login(problem: str, *, enabled: bool) -> str:
    """The page shown without access: a token form, or why there is none."""
    if enabled:
        body = (
            (f'<p class="bad">{e(problem)}</p>' if problem else "")
            + '<form method="get" action="/"><p><label>Admin token<br>'
            '<input type="password" name="token" autocomplete="current-password" required '
            'style="font-size:1rem;padding:6px;width:100%;max-width:28rem"></label></p>'
            '<p><button type="submit" style="font-size:1rem;padding:6px 14px">Open status page</button></p></form>'
            '<p class="muted">The token is the server\'s <code>[admin] token</code>. '
            "A cookie keeps you signed in for 7 days.</p>"
        )
    else:
        body = ('<p>The admin API is off (no <code>[admin] token</code> set), so the status page opens only '
                "from the gateway PC itself (http://127.0.0.1:8080/).</p>")
    return _template().substitute(title="AcuSight edge gateway", subtitle="sign in", body=body, refresh_s=3600)
