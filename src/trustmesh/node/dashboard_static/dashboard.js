// The trustmesh dashboard: renders /dashboard/state.json, live from /dashboard/events.
// Plain DOM and SVG; every value from the node goes in as text, never as markup.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const POLL_MS = 5000; // without an event stream (the node has too many), poll this often
  const RETRY_STREAM_MS = 30000;
  let state = null;
  let skew = 0; // Date.now() minus the node's clock, from the last state

  const $ = (id) => document.getElementById(id);
  const byId = (a, b) => a.localeCompare(b, undefined, { numeric: true });
  const now = () => Date.now() - skew;

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  function span(ms) {
    const s = Math.abs(ms) / 1000;
    if (s < 60) return Math.round(s) + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + Math.round(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
    return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
  }

  function until(ms) {
    if (ms === undefined || ms === null) return "–";
    const left = ms - now();
    return left >= 0 ? "in " + span(left) : span(left) + " ago";
  }

  // A serial as `openssl x509 -serial` prints it, as the CLI does: uppercase, even length.
  function serialText(hex) {
    const up = String(hex).toUpperCase();
    return up.length % 2 ? "0" + up : up;
  }

  function ago(ms) {
    if (ms === undefined || ms === null) return "–";
    return span(now() - ms) + " ago";
  }

  function clock(ms) {
    return new Date(ms).toISOString().replace("T", " ").slice(0, 19) + "Z";
  }

  // --- the graph ---------------------------------------------------------------------

  const ORDER = { self: 0, connected: 1, disconnected: 2, known: 3, revoked: 4 };

  function drawGraph(s) {
    const root = $("graph");
    root.replaceChildren();
    const [w, h] = [640, 440];
    const [cx, cy] = [w / 2, h / 2];
    const me = s.nodes.find((n) => n.state === "self" || n.id === s.node_id);
    const others = s.nodes
      .filter((n) => n !== me)
      .sort((a, b) => (ORDER[a.state] - ORDER[b.state]) || byId(a.id, b.id));
    const small = others.length > 40;
    const r = small ? 7 : 18;
    const ring = Math.min(cx, cy) - (small ? 20 : 48);
    const at = new Map();
    if (me) at.set(me.id, [cx, cy]);
    others.forEach((n, i) => {
      const a = (2 * Math.PI * i) / Math.max(others.length, 1) - Math.PI / 2;
      at.set(n.id, [cx + ring * Math.cos(a), cy + ring * Math.sin(a)]);
    });
    for (const link of s.links) {
      const a = at.get(link.source);
      const b = at.get(link.target);
      if (!a || !b) continue;
      const line = svg("line", {
        x1: a[0], y1: a[1], x2: b[0], y2: b[1],
        class: "link " + (link.direction || ""),
        "data-link": link.source + " " + link.target,
      });
      root.appendChild(line);
    }
    for (const n of me ? [me, ...others] : others) {
      const [x, y] = at.get(n.id);
      const g = svg("g", { class: "node", "data-node": n.id, "data-state": n.state });
      const title = svg("title");
      title.textContent = n.id + " — " + n.state + (n.address ? " — " + n.address : "") +
        (n.not_after_ms ? " — certificate expires " + until(n.not_after_ms) : "");
      g.appendChild(title);
      const radius = n === me ? r + 6 : r;
      g.appendChild(svg("circle", { cx: x, cy: y, r: radius }));
      if (n.state === "revoked") {
        const d = radius * 0.45;
        g.appendChild(svg("path", {
          class: "cross",
          d: `M${x - d},${y - d}L${x + d},${y + d}M${x + d},${y - d}L${x - d},${y + d}`,
        }));
      }
      if (!small || n === me) {
        const label = svg("text", { x: x, y: y + radius + 14 });
        label.textContent = n.id;
        g.appendChild(label);
        if (n.state !== "self" && typeof n.score === "number" && n.score !== 0) {
          const sub = svg("text", { x: x, y: y + radius + 26, class: "sub" });
          sub.textContent = "score " + n.score.toFixed(1);
          g.appendChild(sub);
        }
      }
      root.appendChild(g);
    }
    if (!others.length) {
      const t = svg("text", { x: cx, y: cy + 60, class: "empty" });
      t.textContent = "no other node known yet";
      root.appendChild(t);
    }
  }

  // --- tables and cards ----------------------------------------------------------------

  function fillNodes(s) {
    const body = $("nodes").tBodies[0];
    body.replaceChildren();
    const rows = [...s.nodes].sort(
      (a, b) => (ORDER[a.state] - ORDER[b.state]) || byId(a.id, b.id));
    for (const n of rows) {
      const tr = el("tr", null, n.state);
      tr.dataset.node = n.id;
      tr.appendChild(el("td", n.id));
      tr.appendChild(el("td", n.state === "self" ? "this node" : n.state, "state " + n.state));
      tr.appendChild(el("td", n.direction || "–"));
      tr.appendChild(el("td", n.address || "–", "mono"));
      const score = typeof n.score === "number" ? n.score.toFixed(2) : "–";
      const gray = n.graylisted_until_ms ? " (graylisted)" : "";
      tr.appendChild(el("td", score + gray, "num"));
      tr.appendChild(el("td", until(n.not_after_ms)));
      tr.appendChild(el("td", n.last_seen_ms ? ago(n.last_seen_ms) : "–"));
      body.appendChild(tr);
    }
  }

  function fillAnomalies(s) {
    const body = $("anomalies").tBodies[0];
    body.replaceChildren();
    if (!s.anomalies.length) {
      const td = el("td", "no anomaly received yet", "empty");
      td.colSpan = 6;
      body.appendChild(el("tr")).appendChild(td);
      return;
    }
    for (const a of s.anomalies) {
      const tr = el("tr");
      tr.dataset.message = a.message_id;
      tr.appendChild(el("td", ago(a.received_at)));
      tr.appendChild(el("td", a.origin));
      tr.appendChild(el("td", a.kind));
      tr.appendChild(el("td", Number(a.risk).toFixed(2), "num"));
      tr.appendChild(el("td", String(a.hash).slice(0, 16) + "…", "mono"));
      const c = a.coverage || { links: 0, held: [], sent: [] };
      const td = el("td");
      const bar = el("span", null, "bar");
      const fill = el("span");
      fill.style.width = (c.links ? (100 * c.held.length) / c.links : 0) + "%";
      bar.appendChild(fill);
      td.appendChild(bar);
      let text = `held by ${c.held.length} of ${c.links} links`;
      if (c.sent.length) text += `, sent to ${c.sent.length} more`;
      td.appendChild(document.createTextNode(text));
      td.title = [
        c.held.length ? "held: " + c.held.join(", ") : "",
        c.sent.length ? "sent to: " + c.sent.join(", ") : "",
      ].filter(Boolean).join("\n");
      tr.appendChild(td);
      body.appendChild(tr);
    }
  }

  function fillRevocations(s) {
    const crl = $("crl");
    crl.replaceChildren();
    const facts = s.crl
      ? [
          ["CRL number", s.crl.number],
          ["issued", s.crl.this_update_ms ? ago(s.crl.this_update_ms) : "–"],
          ["next update", until(s.crl.next_update_ms)],
          ["revoked serials", s.revocations.serials],
        ]
      : [["CRL", "none held yet"]];
    for (const [k, v] of facts) {
      crl.appendChild(el("dt", k));
      crl.appendChild(el("dd", v));
    }
    const list = (id, items, none) => {
      const ul = $(id);
      ul.replaceChildren();
      if (!items.length) ul.appendChild(el("li", none, "none"));
      for (const [text, node] of items) {
        const li = el("li", text);
        if (node) li.dataset.node = node;
        ul.appendChild(li);
      }
    };
    list("revoked-nodes", s.revocations.nodes.map((n) => [n, n]), "none");
    list(
      "revoked-serials",
      s.revocations.recent.map((r) => [serialText(r.serial) + "  " + ago(r.revoked_ms), null]),
      "none",
    );
  }

  function fillCards(s) {
    const me = s.nodes.find((n) => n.state === "self") || {};
    $("node-id").textContent = s.node_id;
    document.title = "trustmesh · " + s.node_id;
    const status = $("status");
    status.textContent = me.revoked ? "revoked" : s.status;
    status.className = "badge " + (me.revoked ? "failing" : s.status);
    $("node-count").textContent = s.nodes.length + (s.nodes_left_out ? "+" : "");
    $("link-count").textContent = s.links.length;
    const expiry = $("cert-expiry");
    expiry.textContent = until(me.not_after_ms);
    const left = (me.not_after_ms || 0) - now();
    expiry.className = "value" + (left < 0 ? " bad" : left < 86400000 ? " warn" : "");
    const age = $("crl-age");
    if (s.crl && s.crl.this_update_ms) {
      age.textContent = span(now() - s.crl.this_update_ms);
      const late = s.crl.next_update_ms && s.crl.next_update_ms < now();
      age.className = "value" + (late ? " warn" : "");
    } else {
      age.textContent = "no CRL";
      age.className = "value warn";
    }
    const revoked = $("revoked-count");
    revoked.textContent = s.revocations.nodes.length;
    revoked.className = "value" + (s.revocations.nodes.length ? " bad" : "");
    $("as-of").textContent = "as of " + clock(s.now_ms);
  }

  function render() {
    if (!state) return;
    fillCards(state);
    drawGraph(state);
    fillNodes(state);
    fillAnomalies(state);
    fillRevocations(state);
  }

  function take(text) {
    state = JSON.parse(text);
    skew = Date.now() - state.now_ms;
    render();
  }

  // --- getting the state ------------------------------------------------------------------

  function live(on, text) {
    const badge = $("live");
    badge.className = "live " + (on ? "on" : "off");
    badge.textContent = text;
  }

  let poller = null;

  function poll() {
    fetch("state.json", { cache: "no-store" })
      .then((r) => (r.ok ? r.text() : Promise.reject(new Error(r.status))))
      .then(take)
      .catch(() => live(false, "node unreachable"));
  }

  function stream() {
    const events = new EventSource("events");
    events.addEventListener("state", (e) => {
      take(e.data);
      live(true, "live");
    });
    events.onopen = () => {
      if (poller) clearInterval(poller);
      poller = null;
    };
    events.onerror = () => {
      if (events.readyState === EventSource.CLOSED) {
        // Refused (the node's streams are all taken) or gone: poll, try again later.
        live(false, "polling");
        if (!poller) poller = setInterval(poll, POLL_MS);
        setTimeout(stream, RETRY_STREAM_MS);
      } else {
        live(false, "reconnecting");
      }
    };
  }

  poll();
  stream();
  setInterval(render, 1000); // relative times move on between states
})();
