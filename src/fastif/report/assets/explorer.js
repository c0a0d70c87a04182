"use strict";
// FastIF influence explorer: draws the embedded graph as SVG and wires up selection and filters.
// Data is only ever written with textContent / setAttribute, never parsed as HTML.
(function () {
  const data = JSON.parse(document.getElementById("graph-data").textContent);
  const svg = document.getElementById("graph");
  const NS = svg.namespaceURI;
  const SIGNS = ["helpful", "harmful"];
  const EDGE_COLORS = { helpful: "#2ca02c", harmful: "#d62728" };
  const CENTERS = { helpful: [260, 295], harmful: [780, 295] };
  const RADIUS = 230;
  const colorOf = Object.fromEntries(data.groups.map((g) => [g.name, g.color]));
  const state = { groups: new Set(data.groups.map((g) => g.name)), sign: "both", minAbs: 0, selected: null };
  const maxAbs = data.max_abs > 0 ? data.max_abs : 1;
  const scale = data.scale > 0 ? data.scale : 1;
  const hint = document.querySelector("#details .hint").cloneNode(true);

  function el(tag, attrs, parent) {
    const node = document.createElementNS(NS, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
    if (parent) parent.appendChild(node);
    return node;
  }

  function html(tag, className, text, parent) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function project(sign, xy) {
    const [cx, cy] = CENTERS[sign];
    return [cx + RADIUS * xy[0], cy - RADIUS * xy[1]];
  }

  function signOf(score) {
    return score > 0 ? "helpful" : "harmful";
  }

  function formatScore(score) {
    return (score > 0 ? "+" : "") + Number(score).toPrecision(3);
  }

  const edges = data.edges.map(([test, train, score]) => ({ test, train, score, sign: signOf(score) }));
  const edgesByTest = data.test.map(() => []);
  edges.forEach((edge) => edgesByTest[edge.test].push(edge));

  function drawPanel(sign) {
    const panel = el("g", { class: "panel", "data-sign": sign, id: "panel-" + sign }, svg);
    const title = el("text", { class: "panel-title", x: CENTERS[sign][0], y: 30 }, panel);
    title.textContent = sign === "helpful" ? "Helpful influence" : "Harmful influence";
    const edgeLayer = el("g", { class: "edges" }, panel);
    const testLayer = el("g", { class: "test-points" }, panel);
    const trainLayer = el("g", { class: "train-points" }, panel);
    for (const edge of edges.filter((e) => e.sign === sign)) {
      const [x1, y1] = project(sign, [data.test[edge.test].x, data.test[edge.test].y]);
      const [x2, y2] = project(sign, data.train[edge.train][sign]);
      const strength = Math.min(Math.abs(edge.score) / scale, 1);
      edge.node = el("line", {
        class: "edge", x1, y1, x2, y2, stroke: EDGE_COLORS[sign], "stroke-width": 1 + 3 * strength,
        "stroke-opacity": 0.45 + 0.45 * strength, "data-test": edge.test, "data-train": edge.train,
        "data-sign": sign, "data-score": edge.score,
      }, edgeLayer);
    }
    data.train.forEach((point, index) => {
      if (!point[sign]) return;
      const [cx, cy] = project(sign, point[sign]);
      const r = 2.5 + 4 * point.strength[sign];
      const dot = el("circle", { class: "train-point", cx, cy, r, "data-index": index, "data-sign": sign },
        trainLayer);
      el("title", {}, dot).textContent = point.id + " · " + point.label + ": " + point.text;
    });
    data.test.forEach((point, index) => {
      const [cx, cy] = project(sign, [point.x, point.y]);
      const dot = el("circle", {
        class: "test-point", cx, cy, r: 6, fill: colorOf[point.group], tabindex: 0, role: "button",
        "data-index": index, "data-group": point.group, "aria-label": "test point " + point.id,
      }, testLayer);
      el("title", {}, dot).textContent = "[" + point.group + "] " + point.text;
    });
  }

  function addGroupFilters() {
    const box = document.getElementById("group-filters");
    for (const group of data.groups) {
      const label = html("label", "", undefined, box);
      const input = html("input", "group-filter", undefined, label);
      input.type = "checkbox";
      input.checked = true;
      input.dataset.group = group.name;
      html("span", "swatch", undefined, label).style.backgroundColor = group.color;
      label.appendChild(document.createTextNode(group.name));
      input.addEventListener("change", () => {
        if (input.checked) state.groups.add(group.name);
        else state.groups.delete(group.name);
        update();
      });
    }
  }

  function edgeVisible(edge) {
    return state.groups.has(data.test[edge.test].group) && (state.sign === "both" || state.sign === edge.sign)
      && Math.abs(edge.score) >= state.minAbs;
  }

  function update() {
    const shownTrain = new Set();
    let shown = 0;
    for (const edge of edges) {
      const visible = edgeVisible(edge);
      edge.node.classList.toggle("hidden", !visible);
      edge.node.classList.toggle("dim", state.selected !== null && edge.test !== state.selected);
      edge.node.classList.toggle("focus", edge.test === state.selected);
      if (visible) {
        shown += 1;
        shownTrain.add(edge.sign + ":" + edge.train);
      }
    }
    for (const dot of svg.querySelectorAll("circle.train-point")) {
      dot.classList.toggle("hidden", !shownTrain.has(dot.dataset.sign + ":" + dot.dataset.index));
    }
    for (const dot of svg.querySelectorAll("circle.test-point")) {
      dot.classList.toggle("hidden", !state.groups.has(dot.dataset.group));
      dot.classList.toggle("selected", Number(dot.dataset.index) === state.selected);
    }
    document.getElementById("edge-count").textContent = shown + " of " + edges.length + " edges shown";
  }

  function influenceList(index, sign, parent) {
    html("h3", sign, sign === "helpful" ? "Most helpful training examples" : "Most harmful training examples",
      parent);
    const list = html("ul", "influence-list", undefined, parent);
    list.id = "details-" + sign;
    const chosen = edgesByTest[index].filter((e) => e.sign === sign)
      .sort((a, b) => Math.abs(b.score) - Math.abs(a.score));
    if (chosen.length === 0) html("li", "empty", "none", list);
    for (const edge of chosen) {
      const train = data.train[edge.train];
      const item = html("li", "influence-item", undefined, list);
      item.dataset.trainIndex = edge.train;
      item.dataset.sign = sign;
      html("div", "meta", "score " + formatScore(edge.score) + " · label " + train.label + " · id " + train.id,
        item);
      html("p", "train-text", train.text, item);
    }
  }

  function showDetails(index) {
    const point = data.test[index];
    const details = document.getElementById("details");
    details.replaceChildren();
    details.dataset.index = index;
    html("h2", "", "Test point " + point.id, details);
    html("div", "test-meta", "group " + point.group + " · gold " + point.gold + " · predicted " + point.predicted,
      details);
    html("p", "test-text", point.text, details);
    SIGNS.forEach((sign) => influenceList(index, sign, details));
  }

  function select(index) {
    state.selected = index;
    if (index === null) {
      const details = document.getElementById("details");
      details.replaceChildren(hint.cloneNode(true));
      delete details.dataset.index;
    } else {
      showDetails(index);
    }
    update();
  }

  function testPointAt(event) {
    // Training points drawn on top of a test point (touched by it alone) must not block clicks on it.
    const hit = document.elementsFromPoint(event.clientX, event.clientY).find((n) => n.matches("circle.test-point"));
    return hit ? Number(hit.dataset.index) : null;
  }

  function wireEvents() {
    svg.addEventListener("click", (event) => select(testPointAt(event)));
    svg.addEventListener("keydown", (event) => {
      const target = event.target.closest("circle.test-point");
      if (target && (event.key === "Enter" || event.key === " ")) {
        event.preventDefault();
        select(Number(target.dataset.index));
      }
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape") select(null);
    });
    for (const radio of document.querySelectorAll("input[name=sign]")) {
      radio.addEventListener("change", () => {
        state.sign = radio.value;
        update();
      });
    }
    const slider = document.getElementById("strength");
    slider.addEventListener("input", () => {
      state.minAbs = (maxAbs * Number(slider.value)) / Number(slider.max);
      document.getElementById("strength-value").textContent = Number(state.minAbs).toPrecision(3);
      update();
    });
    document.getElementById("filters").addEventListener("submit", (event) => event.preventDefault());
  }

  SIGNS.forEach(drawPanel);
  addGroupFilters();
  wireEvents();
  update();
})();
