/* swarm status page: polls the coordinator's read-only JSON API and redraws.
 *
 * Safety: every value that came from the network (node names above all) reaches the DOM through
 * textContent, setAttribute on non-script attributes, or canvas fillText. No innerHTML anywhere.
 */
(function () {
  "use strict";
  // Every 3 s; "?poll_ms=N" (500..60000) changes it, e.g. for tests or a slow link.
  var POLL_MS = (function () {
    var m = /[?&]poll_ms=(\d+)/.exec(window.location.search);
    return m ? Math.min(60000, Math.max(500, Number(m[1]))) : 3000;
  })();
  var STATES = ["online", "lost", "left"];
  var selectedJob = null;       // the job whose charts are shown (UI state only)
  var lastNodes = [];           // for names in heatmaps and plan
  var lastNetwork = null;

  // ---------- small helpers ----------
  function $(id) { return document.getElementById(id); }
  function h(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  /* obj[key] only if it is obj's own property (ids from the network may be "constructor"...). */
  function own(obj, key) { return obj && Object.prototype.hasOwnProperty.call(obj, key) ? obj[key] : undefined; }
  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function num(v) { var n = typeof v === "string" && v.trim() !== "" ? Number(v) : v; return isNum(n) ? n : null; }
  /* First present key of obj (or of obj.metrics / obj.status / obj.hardware). */
  function pick(obj, keys) {
    if (!obj || typeof obj !== "object") return undefined;
    var subs = [obj, obj.metrics, obj.status, obj.hardware, obj.stats];
    for (var s = 0; s < subs.length; s++) {
      var o = subs[s];
      if (!o || typeof o !== "object") continue;
      for (var k = 0; k < keys.length; k++) if (o[keys[k]] !== undefined && o[keys[k]] !== null) return o[keys[k]];
    }
    return undefined;
  }
  function asList(data, key) {
    if (Array.isArray(data)) return data;
    if (data && Array.isArray(data[key])) return data[key];
    return [];
  }
  function fmtBytes(b) {
    b = num(b); if (b === null) return "\u2013";
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (Math.abs(b) >= 1024 && i < u.length - 1) { b /= 1024; i++; }
    return (i === 0 ? b.toFixed(0) : b.toFixed(b >= 100 ? 0 : 1)) + " " + u[i];
  }
  function fmtBits(bitsPerS) {
    bitsPerS = num(bitsPerS); if (bitsPerS === null) return "\u2013";
    var u = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"], i = 0;
    while (Math.abs(bitsPerS) >= 1000 && i < u.length - 1) { bitsPerS /= 1000; i++; }
    return bitsPerS.toFixed(bitsPerS >= 100 ? 0 : 1) + " " + u[i];
  }
  function fmtSeconds(s) {
    s = num(s); if (s === null) return "\u2013";
    if (s === 0) return "0 s";
    if (s < 1e-3) return (s * 1e6).toFixed(0) + " \u00b5s";
    if (s < 1) return (s * 1e3).toFixed(s < 0.01 ? 2 : 1) + " ms";
    if (s < 120) return s.toFixed(s < 10 ? 2 : 1) + " s";
    if (s < 7200) return (s / 60).toFixed(1) + " min";
    return (s / 3600).toFixed(1) + " h";
  }
  function fmtAge(s) {
    s = num(s); if (s === null) return "\u2013";
    if (s < 0) s = 0;
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s ago";
    if (s < 3600) return (s / 60).toFixed(0) + " min ago";
    if (s < 172800) return (s / 3600).toFixed(1) + " h ago";
    return (s / 86400).toFixed(0) + " d ago";
  }
  function fmtNum(v, digits) { v = num(v); return v === null ? "\u2013" : v.toFixed(digits); }
  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }  // "1 job", "2 jobs"
  function shortId(id) { id = String(id === undefined || id === null ? "" : id); return id.length > 10 ? id.slice(0, 8) + "\u2026" : id; }
  function stateClass(state) { return "state-" + String(state || "unknown").replace(/[^a-z_]/gi, ""); }
  function nowS() { return Date.now() / 1000; }

  /* Age in seconds of a time value: a Unix timestamp (large) or already an age. */
  function ageOf(obj, ageKeys, tsKeys, serverNow) {
    var a = num(pick(obj, ageKeys));
    if (a !== null) return a;
    var t = num(pick(obj, tsKeys));
    if (t === null) return null;
    return (serverNow || nowS()) - t;
  }

  async function getJSON(path) {
    var r = await fetch(path, { cache: "no-store", headers: { "Accept": "application/json" } });
    if (r.status === 404) return { missing: true };
    if (r.status === 401 || r.status === 403) {
      // The read token (a cookie since /?token=...) is missing or was rotated: say what to open.
      throw new Error(path + ": HTTP " + r.status + ", the status page needs the coordinator's read token: open " +
        "the address swarm-coordinator serve printed after \"status page:\" (it ends in /?token=...)");
    }
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return { data: await r.json() };
  }

  // ---------- nodes ----------
  function fmtGBs(v) { return (v / 1e9).toFixed(v >= 1e11 ? 0 : v >= 1e8 ? 1 : 3) + " GB/s"; }
  function normNode(n) {
    var device = pick(n, ["device", "gpu"]), deviceName = pick(n, ["device_name"]);
    if (device && typeof device === "object") device = [device.kind, device.name].filter(Boolean).join(" ");
    if (deviceName && String(deviceName) !== String(device)) device = String(deviceName) + (device ? " (" + device + ")" : "");
    var stage = stageText(n);
    return {
      id: String(pick(n, ["id", "node_id"]) || ""),
      name: String(pick(n, ["name"]) || ""),
      state: String(pick(n, ["state"]) || "unknown"),
      reach: String(pick(n, ["reachability"]) || ""),  // direct | punched | relayed | pending (docs/nat.md)
      device: device === undefined || device === null ? "" : String(device),
      memory: num(pick(n, ["memory_bytes", "gpu_memory_bytes"])),
      tflops: num(pick(n, ["tflops"])),
      memBw: num(pick(n, ["mem_bandwidth_Bps"])),  // null: not measured (an older node)
      memBwSeen: num(pick(n, ["mem_bandwidth_seen_Bps"])),  // null: no decode step seen yet
      memBwPlan: num(pick(n, ["mem_bandwidth_planning_Bps"])),  // what placement believes
      stage: stage === undefined || stage === null || stage === "" ? "\u2013" : String(stage),
      age: ageOf(n, ["last_seen_age_s", "heartbeat_age_s", "last_seen_s"], ["last_seen_at", "last_heartbeat_at"]),
      // A node's own counters when it reports them; else what it sent for the running job.
      sent: num(pick(n, ["bytes_sent"])),
      jobSent: own(jobTraffic, String(pick(n, ["id", "node_id"]) || "")),
      recv: num(pick(n, ["bytes_received"])),
      jobRecv: own(jobReceived, String(pick(n, ["id", "node_id"]) || "")),
    };
  }
  /* The stage a node serves: the running job's plan (training), its own metrics (a "stage"
   * value, or the inference stages it hosts). */
  var jobStages = Object.create(null);           // node id -> "job J stage S (layers a-b)" from the running job's plan
  function layersText(lr) {
    return Array.isArray(lr) && lr.length === 2 && num(lr[0]) !== null && num(lr[1]) !== null ?
      "layers " + lr[0] + "\u2013" + (lr[1] - 1) : "";
  }
  function stageText(n) {
    var parts = [];
    var id = String(pick(n, ["id", "node_id"]) || "");
    if (own(jobStages, id)) parts.push(String(own(jobStages, id)));
    var st = pick(n, ["stage", "stage_index", "training_stage"]);
    if (st !== undefined && st !== null && typeof st !== "object" && !own(jobStages, id)) parts.push("stage " + st);
    if (st && typeof st === "object") parts.push("stage " + (st.stage !== undefined ? st.stage : "?") + " " + layersText(st.layers));
    var tr = pick(n, ["training"]);  // what a training stage worker reports in heartbeats
    // Only a running job's stage counts: a finished or failed job's worker may still be the
    // last thing an idle node reported.
    if (tr && typeof tr === "object" && !own(jobStages, id) && tr.stage !== undefined &&
        (runningJobs === null || own(runningJobs, String(tr.job_id)) === true)) {
      parts.push("job " + shortId(tr.job_id) + " stage " + tr.stage + " replica " + tr.replica);
    }
    var inf = pick(n, ["inference_stages"]);
    if (Array.isArray(inf)) inf.forEach(function (x) {
      if (x && typeof x === "object") parts.push("serve " + String(x.model || "") + " r" + x.replica + " s" + x.stage + " " + layersText(x.layers));
    });
    return parts.join("; ");
  }
  // job id -> true for the jobs /api/jobs says are running; null: no jobs service, states unknown
  var runningJobs = null;
  function updateRunningJobs(jobsPayload) {
    if (jobsPayload === null) { runningJobs = null; return; }
    runningJobs = Object.create(null);
    asList(jobsPayload, "jobs").forEach(function (j) {
      if (jobKey(j, "state") === "running") runningJobs[String(jobKey(j, "id"))] = true;
    });
  }
  var jobTraffic = Object.create(null);  // node id -> bytes it sent for the running job
  var jobReceived = Object.create(null);  // node id -> bytes it received for it (when known)
  function updateJobStages(planPayload) {
    jobStages = Object.create(null);
    jobTraffic = Object.create(null);
    jobReceived = Object.create(null);
    if (planPayload && Array.isArray(planPayload.traffic)) {
      planPayload.traffic.forEach(function (w) {
        var b = num(w && w.bytes_sent), r = num(w && w.bytes_received), id = String(w && w.node_id);
        if (b !== null) jobTraffic[id] = (jobTraffic[id] || 0) + b;
        if (r !== null) jobReceived[id] = (jobReceived[id] || 0) + r;
      });
    }
    if (!planPayload || planPayload.source !== "job" || !planPayload.plan) return;
    normStages(planPayload.plan).forEach(function (s) {
      s.members.forEach(function (m, r) {
        jobStages[m] = "stage " + s.index + " replica " + r + " " + layersText([s.start, s.end]);
      });
    });
  }
  var STATE_ORDER = { online: 0, lost: 1, left: 2 };
  function renderNodes(payload) {
    var nodes = asList(payload, "nodes").map(normNode);
    nodes.sort(function (a, b) {
      var sa = own(STATE_ORDER, a.state) !== undefined ? STATE_ORDER[a.state] : 3;
      var sb = own(STATE_ORDER, b.state) !== undefined ? STATE_ORDER[b.state] : 3;
      return sa - sb || a.name.localeCompare(b.name, undefined, { numeric: true }) || a.id.localeCompare(b.id);
    });
    lastNodes = nodes;
    var counts = { online: 0, lost: 0, left: 0 };
    var frag = document.createDocumentFragment();
    nodes.forEach(function (n) {
      if (own(counts, n.state) !== undefined) counts[n.state]++;
      var tr = h("tr", "row-" + n.state.replace(/[^a-z_]/gi, ""));
      tr.setAttribute("data-node-id", n.id);
      var name = h("td", "name", n.name); name.title = n.name; tr.appendChild(name);
      var id = h("td", "mono id", shortId(n.id)); id.title = n.id; tr.appendChild(id);
      var st = h("td", "state"); var pill = h("span", "pill " + stateClass(n.state), n.state);
      st.appendChild(pill); st.setAttribute("data-state", n.state); tr.appendChild(st);
      if (n.reach && n.reach !== "direct") {  // behind NAT: reached through a relay (or a punched hole)
        var rp = h("span", "pill reach reach-" + n.reach.replace(/[^a-z]/gi, ""), n.reach);
        rp.title = n.reach === "relayed" ? "behind NAT: peers reach it through a relay" :
          n.reach === "punched" ? "behind NAT: hole punched to some peers, relayed for the others" :
          "not yet dialled back by the coordinator";
        st.appendChild(document.createTextNode(" ")); st.appendChild(rp); st.setAttribute("data-reachability", n.reach);
      }
      tr.appendChild(h("td", "device", n.device || "\u2013"));
      tr.appendChild(h("td", "num", n.memory === null ? "\u2013" : fmtBytes(n.memory)));
      tr.appendChild(h("td", "num", n.tflops === null ? "\u2013" : n.tflops >= 1 ? n.tflops.toFixed(1) :
        n.tflops > 0 ? n.tflops.toPrecision(2) : "0"));  // CPUs measure well below 1 TFLOPS
      var bw = h("td", "num mem-bw", n.memBw === null ? "\u2013" : fmtGBs(n.memBw));
      if (n.memBwSeen !== null) {  // what its decode steps showed (a lower bound: coordinator/inference/memwatch.py)
        var cut = n.memBw !== null && n.memBwPlan !== null && n.memBwPlan < n.memBw;
        bw.appendChild(h("div", "sub mem-bw-seen" + (cut ? " cut" : ""), "seen " + fmtGBs(n.memBwSeen)));
        bw.title = "claimed (probe) " + (n.memBw === null ? "not measured" : fmtGBs(n.memBw)) + "; decode steps showed at least " +
          fmtGBs(n.memBwSeen) + (cut ? "; placement uses " + fmtGBs(n.memBwPlan) + " (the claim is more than 4x what was seen)" : "");
      }
      tr.appendChild(bw);
      tr.appendChild(h("td", "stage-cell", n.stage));
      var age = h("td", "num age", fmtAge(n.age));
      if (n.state === "online" && n.age !== null && n.age > 6) age.classList.add("stale");
      tr.appendChild(age);
      var sent = h("td", "num sent", fmtBytes(n.sent !== null ? n.sent : n.jobSent));
      if (n.sent === null && n.jobSent !== undefined) sent.title = "sent for the running job (after compression)";
      else if (n.sent !== null) sent.title = "sent to peers since the node started";
      tr.appendChild(sent);
      var recv = h("td", "num received", fmtBytes(n.recv !== null ? n.recv : n.jobRecv));
      if (n.recv === null && n.jobRecv !== undefined) recv.title = "received for the running job (after compression)";
      else if (n.recv !== null) recv.title = "received from peers since the node started";
      tr.appendChild(recv);
      frag.appendChild(tr);
    });
    $("nodes-body").replaceChildren(frag);
    STATES.forEach(function (s) { $("count-" + s).textContent = String(counts[s]); });
    $("nodes-count").textContent = plural(nodes.length, "node");
    $("nodes-empty").hidden = nodes.length > 0;
    $("nodes-table").hidden = nodes.length === 0;
  }

  // ---------- network heatmaps ----------
  /* Normalise /api/network into {ids, bw (bit/s), lat (s), age (s)} matrices; null where unmeasured. */
  function normNetwork(data) {
    if (!data || typeof data !== "object") return { ids: [], bw: [], lat: [], age: [] };
    var serverNow = num(data.server_time || data.now_s || data.now);
    var ids = (data.node_ids || data.nodes || data.ids || []).map(function (x) {
      return typeof x === "object" && x ? String(x.id || x.node_id) : String(x);
    });
    var links = Array.isArray(data.links) ? data.links : [];
    if (ids.length === 0) {
      // No explicit order: the nodes table's (online first), then any other link endpoint.
      lastNodes.forEach(function (nd) { if (nd.state !== "left") ids.push(nd.id); });
      links.forEach(function (l) {
        [l.src, l.dst].forEach(function (x) { if (x !== undefined && ids.indexOf(String(x)) < 0) ids.push(String(x)); });
      });
    }
    var n = ids.length;
    function empty() { var m = []; for (var i = 0; i < n; i++) { m.push(new Array(n).fill(null)); } return m; }
    var bw = empty(), lat = empty(), age = empty(), path = empty();
    var bwBytes = data.bandwidth_Bps || data.bandwidth_bytes_per_s;
    var bwBits = data.bandwidth_bps || data.bandwidth_bits_per_s;
    // Round trips: an rtt matrix as is, a one-way delay matrix doubled; links' rtt_s win below.
    var latM = data.rtt_s || data.latency_s || data.delay_s;
    var latFactor = data.rtt_s || data.latency_s ? 1 : 2;
    var ageM = data.age_s || data.measurement_age_s;
    var atM = data.measured_at || data.measured_at_s;
    if (Array.isArray(bwBytes) || Array.isArray(bwBits) || Array.isArray(latM)) {
      for (var i = 0; i < n; i++) for (var j = 0; j < n; j++) {
        var v;
        if (Array.isArray(bwBits) && bwBits[i]) { v = num(bwBits[i][j]); bw[i][j] = v !== null && v > 0 ? v : null; }
        else if (Array.isArray(bwBytes) && bwBytes[i]) { v = num(bwBytes[i][j]); bw[i][j] = v !== null && v > 0 ? v * 8 : null; }
        if (Array.isArray(latM) && latM[i]) { v = num(latM[i][j]); lat[i][j] = v !== null && v >= 0 ? v * latFactor : null; }
        if (Array.isArray(ageM) && ageM[i]) age[i][j] = num(ageM[i][j]);
        else if (Array.isArray(atM) && atM[i]) { v = num(atM[i][j]); age[i][j] = v === null ? null : (serverNow || nowS()) - v; }
      }
    }
    links.forEach(function (l) {
      var a = ids.indexOf(String(l.src || l.from || l.source)), b = ids.indexOf(String(l.dst || l.to || l.target));
      if (a < 0 || b < 0) return;
      var bits = num(l.bandwidth_bps), bytes = num(l.bandwidth_Bps !== undefined ? l.bandwidth_Bps : l.bandwidth_bytes_per_s);
      if (bits !== null) bw[a][b] = bits; else if (bytes !== null) bw[a][b] = bytes * 8;
      var lt = num(l.rtt_s !== undefined ? l.rtt_s : l.latency_s !== undefined ? l.latency_s : l.delay_s);
      if (lt !== null) lat[a][b] = lt;
      age[a][b] = ageOf(l, ["age_s"], ["measured_at", "measured_at_s"], serverNow);
      if (typeof l.path === "string") path[a][b] = l.path;
    });
    var names = {};
    if (Array.isArray(data.names)) data.names.forEach(function (nm, k) { if (k < ids.length) names[ids[k]] = String(nm); });
    return { ids: ids, bw: bw, lat: lat, age: age, path: path, names: names, fetchedAt: nowS() };
  }

  var planNames = {};
  function nameOf(id) {
    if (own(planNames, id)) return String(own(planNames, id));
    for (var k = 0; k < lastNodes.length; k++) if (lastNodes[k].id === id) return lastNodes[k].name || shortId(id);
    if (lastNetwork && own(lastNetwork.names, id)) return String(own(lastNetwork.names, id));
    return shortId(id);
  }

  function renderNetwork(payload) {
    var net = normNetwork(payload);
    lastNetwork = net;
    var measured = net.bw.some(function (r) { return r.some(function (v) { return v !== null; }); }) ||
      net.lat.some(function (r) { return r.some(function (v) { return v !== null; }); });
    $("network-empty").hidden = measured;
    var common = { label: nameOf, tip: $("heatmap-tip"),
      ageText: function (i, j) {  // ages were taken at fetch time: add the time since
        var a = net.age[i] ? num(net.age[i][j]) : null;
        var p = net.path && net.path[i] ? net.path[i][j] : null;  // relayed / punched links are marked
        return "measured " + fmtAge(a === null ? null : a + nowS() - net.fetchedAt) + (p && p !== "direct" ? ", " + p : "");
      } };
    SwarmHeatmap.draw($("heatmap-bandwidth"), net.ids, net.bw, Object.assign({ goodHigh: true, format: fmtBits }, common));
    SwarmHeatmap.draw($("heatmap-latency"), net.ids, net.lat, Object.assign({ goodHigh: false, format: fmtSeconds }, common));
  }

  // ---------- plan ----------
  function normStages(plan) {
    var stages = Array.isArray(plan.stages) ? plan.stages : Array.isArray(plan.pipeline) ? plan.pipeline : [];
    return stages.filter(function (s) { return s && typeof s === "object"; }).map(function (s, k) {
      var members = s.nodes || s.node_ids || s.devices || s.dp_group || s.members || [];
      if (!Array.isArray(members)) members = [];
      members = members.map(function (m) { return typeof m === "object" && m ? String(m.id || m.node_id || m.name) : String(m); });
      var start = s.layer_start, end = s.layer_end;
      if (Array.isArray(s.layers)) { start = s.layers[0]; end = s.layers[s.layers.length - 1]; }
      if (num(s.num_layers) !== null && start !== undefined && end === undefined) end = start + s.num_layers;
      return {
        index: s.index !== undefined ? s.index : s.stage !== undefined ? s.stage : k,
        start: start, end: end, members: members,
        compute: num(s.compute_s !== undefined ? s.compute_s : s.predicted_compute_s),
      };
    });
  }
  function linkBandwidth(a, b) {
    // Adjacent stages are chained replica by replica (member r of one to member r of the next);
    // show the slowest of those links, which bounds the pipeline.
    if (!lastNetwork) return null;
    var worst = null, pairs = Math.min(a.members.length, b.members.length);
    for (var r = 0; r < pairs; r++) {
      var i = lastNetwork.ids.indexOf(a.members[r]), j = lastNetwork.ids.indexOf(b.members[r]);
      if (i < 0 || j < 0) return null;
      var v = lastNetwork.bw[i][j];
      if (v === null) return null;
      worst = worst === null ? v : Math.min(worst, v);
    }
    return worst;
  }
  /* [[part, seconds]] and the total, from the server's "predicted" (see plan_view.py). */
  function breakdownOf(payload) {
    var p = (payload && payload.predicted) || {};
    var parts = [["compute", num(p.compute_s)], ["pipeline", num(p.pipeline_s)], ["data_parallel", num(p.data_parallel_s)]];
    return { parts: parts, total: num(p.total_s) };
  }
  function renderPlan(payload) {
    var box = $("plan-pipeline"), bd = $("plan-breakdown");
    var plan = payload && payload.plan;
    var source = payload && payload.source;
    if (!plan) {
      box.replaceChildren(); bd.replaceChildren();
      $("plan-source").textContent = "";
      $("plan-reason").textContent = "";
      $("plan-empty").textContent = (payload && payload.reason) ? String(payload.reason) : "No plan: there are no online nodes to plan over.";
      $("plan-empty").hidden = false;
      return;
    }
    $("plan-empty").hidden = true;
    $("plan-source").textContent = source === "job" ? "of running job " + String(payload.job_id || "") :
      source === "preview" ? "preview (no job running)" : "";
    $("plan-reason").textContent = payload.reason && source !== "job" ? String(payload.reason) : "";
    planNames = payload.names && typeof payload.names === "object" ? payload.names : {};
    var stages = normStages(plan);
    var frag = document.createDocumentFragment();
    var states = {}; lastNodes.forEach(function (n) { states["n:" + n.id] = n.state; });
    stages.forEach(function (s, k) {
      if (k > 0) {
        var link = h("div", "link");
        var bwv = linkBandwidth(stages[k - 1], s);
        link.appendChild(h("span", null, bwv === null ? "link not measured" : fmtBits(bwv)));
        link.title = "slowest link between the two stages' replicas, as measured";
        link.appendChild(h("div", "arrow"));
        var bnd = plan.breakdown && Array.isArray(plan.breakdown.boundary_s) ? num(plan.breakdown.boundary_s[k - 1]) : null;
        link.appendChild(h("span", null, bnd === null ? "activations \u2192" : "activations " + fmtSeconds(bnd)));
        frag.appendChild(link);
      }
      var box1 = h("div", "stage");
      box1.setAttribute("data-stage", String(s.index));
      box1.appendChild(h("div", "title", "Stage " + s.index));
      box1.appendChild(h("div", "layers", s.start !== undefined && s.end !== undefined ?
        "layers " + s.start + "\u2013" + (num(s.end) !== null ? s.end - 1 : s.end) : ""));
      if (s.compute !== null) box1.appendChild(h("div", "time", "compute " + fmtSeconds(s.compute)));
      var ul = h("ul"), SHOWN = 8;
      s.members.slice(0, SHOWN).forEach(function (m) {
        var li = h("li", states["n:" + m] && states["n:" + m] !== "online" ? "lost" : null, nameOf(m));
        li.title = m; ul.appendChild(li);
      });
      if (s.members.length > SHOWN) {
        var more = h("li", "more", "+" + (s.members.length - SHOWN) + " more");
        more.title = s.members.slice(SHOWN).map(nameOf).join("\n");
        ul.appendChild(more);
      }
      box1.appendChild(h("div", "layers", "data-parallel group of " + s.members.length));
      box1.appendChild(ul);
      frag.appendChild(box1);
    });
    box.replaceChildren(frag);
    var b = breakdownOf(payload);
    var sum = b.parts.reduce(function (acc, p) { return acc + (p[1] || 0); }, 0);
    var total = b.total !== null ? b.total : sum;
    var commOnly = plan.objective === "dtfm_comm";
    var items = [h("div", null, "Predicted step time: " + fmtSeconds(total) +
      (commOnly ? " (communication only: the devices are identical, so the DT-FM cost model leaves compute out)" : ""))];
    if (sum > 0) {
      var bar = h("div", "bar");
      b.parts.forEach(function (p) {
        if (!p[1]) return;
        var seg = h("div", "seg seg-" + p[0]); seg.style.width = (100 * p[1] / Math.max(sum, total)) + "%";
        seg.title = p[0].replace("_", " ") + ": " + fmtSeconds(p[1]); bar.appendChild(seg);
      });
      items.push(bar);
      var keys = h("div");
      b.parts.forEach(function (p) {
        if (p[1] === null || (commOnly && p[0] === "compute")) return;
        var key = h("span", "key"); key.appendChild(h("i", "seg-" + p[0]));
        key.appendChild(h("span", null, p[0].replace("_", " ") + " " + fmtSeconds(p[1]))); keys.appendChild(key);
      });
      items.push(keys);
    }
    bd.replaceChildren.apply(bd, items);
  }

  // ---------- models ----------
  /* /api/models: what `swarm models --json` prints (swarm/transport/coordinator_client.py
   * ModelRecord.to_json): name, state, replica_count {healthy, requested}, healing, replicas,
   * routes_enabled, routes [{replicas, node_ids, sessions, predicted_s_per_token}], disaggregation
   * {mode, enabled, prefill_nodes, decode_nodes, predicted_gain, reason, kv_bytes_moved, num_handoffs}. */
  function renderModels(payload) {
    var models = asList(payload, "models");
    $("models-count").textContent = models.length ? plural(models.length, "model") : "";
    $("models-empty").hidden = models.length > 0;
    $("models-table").hidden = models.length === 0;
    var frag = document.createDocumentFragment();
    models.forEach(function (m) {
      var tr = h("tr");
      tr.appendChild(h("td", "name", String(own(m, "name") || "")));
      var state = String(own(m, "state") || "unknown");
      var st = h("td", "state"); st.appendChild(h("span", "pill " + stateClass(state), state)); tr.appendChild(st);
      var rc = own(m, "replica_count") || {};
      var healthy = num(own(rc, "healthy")), requested = num(own(rc, "requested"));
      var count = h("td", "num", (healthy === null ? "\u2013" : healthy) + " / " + (requested === null ? "\u2013" : requested));
      if (healthy !== null && requested !== null && healthy < requested) count.className += " below";
      var healing = own(m, "healing");
      if (healing) { count.appendChild(h("div", "info", String(healing))); }
      tr.appendChild(count);
      var chains = h("td", "mono");
      (Array.isArray(own(m, "replicas")) ? own(m, "replicas") : []).forEach(function (r) {
        var stages = Array.isArray(own(r, "stages")) ? own(r, "stages") : [];
        chains.appendChild(h("div", null, "r" + own(r, "replica") + ": " + stages.map(function (s) {
          return shortId(own(s, "node_id")) + " " + layersText([own(s, "first_layer"), own(s, "last_layer_excl")]);
        }).join(" \u2192 ")));
      });
      tr.appendChild(chains);
      // per-request routes (swarm serve --routes): the replica of each stage, and its sessions
      var routes = h("td", "mono");
      var rlist = Array.isArray(own(m, "routes")) ? own(m, "routes") : [];
      // disaggregated prefill and decode (swarm serve --disaggregate {auto,on,off}): the split, its KV
      // moves, the prediction; served colocated, the mode and why it was not applied
      var dis = own(m, "disaggregation") || {};
      var dmode = own(dis, "mode") ? " (--disaggregate " + String(own(dis, "mode")) + ")" : "";
      if (own(dis, "enabled")) {
        var pre = Array.isArray(own(dis, "prefill_nodes")) ? own(dis, "prefill_nodes") : [];
        var dec = Array.isArray(own(dis, "decode_nodes")) ? own(dis, "decode_nodes") : [];
        var gain = num(own(dis, "predicted_gain"));
        routes.appendChild(h("div", null, "disaggregated" + dmode + ": prefill " + pre.map(shortId).join(", ") + " \u21d2 decode " +
          dec.map(shortId).join(", ") + "; " + plural(num(own(dis, "num_handoffs")) || 0, "KV hand-off") + ", " +
          ((num(own(dis, "kv_bytes_moved")) || 0) / 1024).toFixed(1) + " KiB moved" +
          (gain === null ? "" : "; predicted " + gain.toFixed(2) + "\u00d7 throughput")));
        if (own(dis, "reason")) routes.appendChild(h("div", "info", String(own(dis, "reason"))));
      } else if (!own(m, "routes_enabled")) routes.textContent = "fixed chains";
      else if (!rlist.length) routes.textContent = "no sessions";
      if (!own(dis, "enabled") && own(dis, "reason")) {
        var dgain = num(own(dis, "predicted_gain"));
        routes.appendChild(h("div", "info", "not disaggregated" + dmode +
          (dgain === null ? "" : ", predicted " + dgain.toFixed(2) + "\u00d7") + ": " + String(own(dis, "reason"))));
      }
      rlist.forEach(function (r) {
        var reps = Array.isArray(own(r, "replicas")) ? own(r, "replicas") : [];
        var ids = Array.isArray(own(r, "node_ids")) ? own(r, "node_ids") : [];
        var pred = num(own(r, "predicted_s_per_token"));
        routes.appendChild(h("div", null, reps.map(function (x, i) {
          return "r" + x + (ids[i] ? " " + shortId(ids[i]) : "");
        }).join(" \u2192 ") + ": " + plural(num(own(r, "sessions")) || 0, "session") +
          (pred === null ? "" : ", ~" + (pred * 1e3).toFixed(2) + " ms/token")));
      });
      tr.appendChild(routes);
      frag.appendChild(tr);
    });
    $("models-body").replaceChildren(frag);
  }

  // ---------- jobs ----------
  /* A job of /api/jobs: the keys of swarm/job_detail.py's JobDetail.summary_json, read with
   * jobKey only (tests/unit/web check these names against the record). */
  function jobKey(j, key) { return j && typeof j === "object" ? own(j, key) : undefined; }
  function normJob(j) {
    var step = num(jobKey(j, "step")), total = num(jobKey(j, "total_steps"));
    var progress = null;
    // Steps are numbered from 0 (step k means k + 1 done).
    if (step !== null && total) progress = (step + 1) / total;
    if (progress === null && jobKey(j, "state") === "succeeded") progress = 1;
    var spec = jobKey(j, "spec"), model = jobKey(j, "model");
    return {
      id: String(jobKey(j, "id") || ""),
      name: String((spec && spec.name) || (model && typeof model === "object" ? model.family || "" : "")),
      state: String(jobKey(j, "state") || "unknown"),
      step: step, total: total, progress: progress,
      loss: num(jobKey(j, "loss")),
      tps: num(jobKey(j, "tokens_per_s")),
      eta: num(jobKey(j, "eta_s")),
      saved: num(jobKey(j, "bytes_saved")),
    };
  }
  function renderJobs(payload) {
    var jobs = asList(payload, "jobs").map(normJob);
    $("count-jobs").textContent = plural(jobs.length, "job");
    $("jobs-count").textContent = jobs.length ? plural(jobs.length, "job") : "";
    $("jobs-empty").hidden = jobs.length > 0;
    $("jobs-table").hidden = jobs.length === 0;
    if (!jobs.some(function (j) { return j.id === selectedJob; })) {
      var running = jobs.filter(function (j) { return j.state === "running"; });
      // /api/jobs lists the newest first: show the running job, else the newest.
      selectedJob = running.length ? running[0].id : jobs.length ? jobs[0].id : null;
    }
    var frag = document.createDocumentFragment();
    jobs.forEach(function (j) {
      var tr = h("tr", "job" + (j.id === selectedJob ? " selected" : ""));
      tr.setAttribute("data-job-id", j.id);
      tr.onclick = function () { selectedJob = j.id; poll(); };
      var name = h("td", "name", j.name ? j.name + " " : ""); name.appendChild(h("span", "mono", shortId(j.id)));
      name.title = j.id; tr.appendChild(name);
      var st = h("td", "state"); st.appendChild(h("span", "pill " + stateClass(j.state), j.state)); tr.appendChild(st);
      var pr = h("td"); var bar = h("span", "progress"); var fill = h("div");
      fill.style.width = (j.progress === null ? 0 : Math.max(0, Math.min(1, j.progress)) * 100) + "%";
      bar.appendChild(fill); pr.appendChild(bar);
      pr.appendChild(h("span", null, j.step !== null ? "step " + (j.step + 1) + (j.total ? " / " + j.total : "") :
        j.progress !== null ? (100 * j.progress).toFixed(0) + "%" : ""));
      tr.appendChild(pr);
      tr.appendChild(h("td", "num", fmtNum(j.loss, 3)));
      tr.appendChild(h("td", "num", fmtNum(j.tps, 0)));
      tr.appendChild(h("td", "num", j.eta === null ? "\u2013" : fmtSeconds(j.eta)));
      tr.appendChild(h("td", "num", j.saved === null ? "\u2013" : fmtBytes(j.saved)));
      var a = h("a", null, "JSON"); a.setAttribute("href", "api/jobs/" + encodeURIComponent(j.id));
      a.addEventListener("click", function (ev) { ev.stopPropagation(); });
      var link = h("td"); link.appendChild(a); tr.appendChild(link);
      frag.appendChild(tr);
    });
    $("jobs-body").replaceChildren(frag);
  }
  /* History as [[step, loss]], [[step, tokens/s]] from the job's "progress" (ProgressPoint records). */
  function historyOf(job) {
    var hist = jobKey(job, "progress");
    var loss = [], tps = [];
    if (Array.isArray(hist)) {
      hist.forEach(function (r, k) {
        var step = num(jobKey(r, "step")); if (step === null) step = k;
        var l = num(jobKey(r, "loss")), t = num(jobKey(r, "tokens_per_s"));
        if (l !== null) loss.push([step, l]);
        if (t !== null) tps.push([step, t]);
      });
    }
    return { loss: loss, tps: tps };
  }
  // A job's events (node lost, replica dropped, re-plan, resume, coordinator restart...), newest
  // last, each with its time; textContent only: messages come from the coordinator's store.
  function renderEvents(events) {
    var list = $("job-events");
    if (!list) return;
    list.textContent = "";
    (Array.isArray(events) ? events.slice(-50) : []).forEach(function (e) {
      var li = document.createElement("li");
      // an event record (swarm/job_detail.py JobEvent: seq, at, kind, message, fields)
      var at = num(own(e, "at"));
      li.textContent = (at !== null ? new Date(at * 1000).toLocaleTimeString() + "  " : "") + String(own(e, "message") || own(e, "kind") || "");
      li.className = "event-" + String(own(e, "kind") || "");
      list.appendChild(li);
    });
  }

  async function renderJobDetail() {
    var box = $("job-detail");
    if (!selectedJob) { box.hidden = true; return; }
    var res = await getJSON("api/jobs/" + encodeURIComponent(selectedJob));
    if (res.missing || !res.data) { box.hidden = true; return; }
    var job = res.data;  // a JobDetail (swarm/job_detail.py)
    var spec = jobKey(job, "spec"), progress = jobKey(job, "progress");
    $("job-detail-id").textContent = String((spec && spec.name) || "") + " " + selectedJob;
    var hist = historyOf(job);
    var last = Array.isArray(progress) && progress.length ? progress[progress.length - 1] : null;
    var info = [];
    if (jobKey(job, "reason")) info.push(String(jobKey(job, "reason")));
    if (last) {
      info.push("last step " + fmtSeconds(jobKey(last, "step_s")) + " (compute " + fmtSeconds(jobKey(last, "compute_s")) +
        ", waiting " + fmtSeconds(jobKey(last, "wait_s")) + ", communication " + fmtSeconds(jobKey(last, "comm_s")) + ")");
    }
    if (num(jobKey(job, "bytes_sent")) !== null) {
      info.push("sent " + fmtBytes(jobKey(job, "bytes_sent")) + ", saved by compression " + fmtBytes(jobKey(job, "bytes_saved")));
    }
    var plan = jobKey(job, "plan");
    if (plan && num(plan.d_pp) !== null) info.push(plan.d_pp + " stages \u00d7 " + plan.d_dp + " replicas");
    // helper replicas of a slow stage (coordinator/jobs/helpers.py): not in the plan, in the assignments
    var helpers = (Array.isArray(jobKey(job, "assignments")) ? jobKey(job, "assignments") : []).filter(function (a) {
      return a && num(a.share_index) > 0;
    });
    if (helpers.length) info.push(helpers.length + " helper" + (helpers.length > 1 ? "s" : "") + " at stage " + helpers[0].stage);
    $("job-detail-info").textContent = info.join(" \u00b7 ");
    renderEvents(jobKey(job, "events"));
    // x is the step number: integer ticks only (a 3-step job has no step 0.5)
    MiniChart.line($("chart-loss"), hist.loss, { color: "#d64545", emptyText: "no loss reported yet", xInteger: true });
    MiniChart.line($("chart-tps"), hist.tps, { color: "#2b6cb0", emptyText: "no throughput reported yet", xInteger: true });
    box.hidden = false;
  }

  // ---------- polling ----------
  var inFlight = false;
  /* /api/network is the big answer (N x N matrices: ~1 MB at 200 nodes) and changes slowly (links
   * are re-measured every few minutes). Fetch it when the online nodes changed, while a small
   * swarm's matrix is still filling in, and otherwise every NETWORK_REFRESH_MS. */
  var NETWORK_REFRESH_MS = 15000, networkFetchedMs = 0;
  function networkDue() {
    if (!lastNetwork || Date.now() - networkFetchedMs >= NETWORK_REFRESH_MS) return true;
    var online = lastNodes.filter(function (n) { return n.state === "online"; }).map(function (n) { return n.id; });
    if (online.slice().sort().join(",") !== lastNetwork.ids.slice().sort().join(",")) return true;
    var n = lastNetwork.ids.length, missing = false;
    for (var i = 0; i < n && !missing; i++) for (var j = 0; j < n; j++) {
      if (i !== j && lastNetwork.bw[i][j] === null) { missing = true; break; }
    }
    return missing && n <= 32;
  }
  async function poll() {
    if (inFlight) return;
    inFlight = true;
    var problems = [];
    async function fetchOne(path, optional) {
      try {
        var res = await getJSON(path);
        if (res.missing && !optional) problems.push(path + ": not found");
        return res.missing ? null : res.data;
      } catch (err) { problems.push(String(err.message || err)); return undefined; }
    }
    function draw(name, fn, data) {
      if (data === undefined) return;  // fetch failed: keep what is shown
      try { fn(data); } catch (err) { problems.push(name + ": " + String(err.message || err)); }
    }
    try {
      // Nodes first: whether the network matrix is due depends on who is online now.
      var nodes = await fetchOne("api/nodes");
      if (nodes !== undefined) lastNodes = asList(nodes, "nodes").map(normNode);
      var wantNetwork = networkDue();
      var got = [nodes].concat(await Promise.all([wantNetwork ? fetchOne("api/network") : undefined,
        fetchOne("api/plan"), fetchOne("api/jobs", true), fetchOne("api/models", true)]));
      if (wantNetwork && got[1] !== undefined) networkFetchedMs = Date.now();
      if (got[2] !== undefined) updateJobStages(got[2]);
      if (got[3] !== undefined) updateRunningJobs(got[3]);  // before the nodes: their Stage column uses it
      draw("nodes", renderNodes, got[0]);
      draw("network", renderNetwork, got[1]);
      draw("plan", renderPlan, got[2]);
      draw("jobs", renderJobs, got[3]);
      draw("models", renderModels, got[4]);
      try { await renderJobDetail(); } catch (err) { problems.push(String(err.message || err)); }
    } finally {
      inFlight = false;
    }
    var status = $("status");
    status.setAttribute("data-ok", problems.length ? "false" : "true");
    status.textContent = (problems.length ? "problem: " + problems.join("; ") + " \u2014 " : "") +
      "updated " + new Date().toLocaleTimeString() + ", every " + POLL_MS / 1000 + " s";
    document.body.setAttribute("data-polls", String((Number(document.body.getAttribute("data-polls")) || 0) + 1));
  }

  function loop() { poll().finally(function () { setTimeout(loop, POLL_MS); }); }
  document.addEventListener("DOMContentLoaded", loop);
})();
