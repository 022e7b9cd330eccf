// medseg review page: case table (sort, filter) and a slice viewer that loads each case's
// data file (review/case-NNNN.js, a <script>, so it also works opened from disk) on demand.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("review-data").textContent);
  const byId = (id) => document.getElementById(id);
  const CACHE_SIZE = 6; // decoded cases kept in memory
  const cache = new Map(); // case index -> decoded case
  const pending = new Map(); // case index -> {promise, resolve, reject, received}
  const colours = [null];
  data.classes.forEach((c) => { colours[c.index] = c.colour; });
  const state = {
    current: null, // entry of data.cases
    view: null, // decoded case on screen
    axis: 2,
    slice: [0, 0, 0],
    opacity: 0.45,
    level: 0,
    width: 1,
    showReference: true,
    visible: colours.map(() => true),
  };
  const viewable = data.cases.filter((c) => c.file);
  const PRESETS = { "soft tissue": [40, 400], lung: [-600, 1500], bone: [400, 1800], brain: [40, 80] };

  // ------------------------------------------------------------------ loading case data

  function receive(payload) {
    const entry = pending.get(payload.index);
    if (!entry) return;
    entry.received = true;
    decode(payload).then(entry.resolve, entry.reject);
  }

  async function inflate(b64) {
    const text = atob(b64);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  function joinBytePlanes(raw) {
    // 16-bit values arrive as all low bytes, then all high bytes.
    const n = raw.length / 2;
    const out = new Uint16Array(n);
    for (let i = 0; i < n; i++) out[i] = raw[i] | (raw[n + i] << 8);
    return out;
  }

  async function decode(p) {
    const c = Object.assign({}, p);
    c.mask = await inflate(p.mask);
    c.reference = p.reference ? await inflate(p.reference) : null;
    c.image = null;
    if (p.image) {
      const raw = await inflate(p.image.data);
      c.image = p.image.dtype === "uint16" ? joinBytePlanes(raw) : raw;
      c.offset = p.image.offset;
      c.scale = p.image.scale;
      let top = 0;
      for (let i = 0; i < c.image.length; i++) if (c.image[i] > top) top = c.image[i];
      c.low = p.image.offset;
      c.high = p.image.offset + Math.max(top, 1) * p.image.scale;
    }
    return c;
  }

  function loadCase(entry) {
    if (cache.has(entry.index)) {
      const hit = cache.get(entry.index);
      cache.delete(entry.index);
      cache.set(entry.index, hit);
      return Promise.resolve(hit);
    }
    if (pending.has(entry.index)) return pending.get(entry.index).promise;
    if (typeof DecompressionStream === "undefined") {
      return Promise.reject(new Error("This browser cannot unpack the case data (it needs DecompressionStream: " +
        "Chrome 80, Firefox 113, Safari 16.4 or newer)."));
    }
    const job = { received: false };
    job.promise = new Promise((resolve, reject) => { job.resolve = resolve; job.reject = reject; });
    pending.set(entry.index, job);
    const script = document.createElement("script");
    script.src = entry.file;
    script.onload = () => {
      script.remove();
      if (!job.received) job.reject(new Error(entry.file + " does not hold this case; rebuild the page with `medseg view --rebuild`"));
    };
    script.onerror = () => {
      script.remove();
      job.reject(new Error("cannot load " + entry.file + "; rebuild the page with `medseg view --rebuild`"));
    };
    document.head.appendChild(script);
    const done = job.promise.then((decoded) => {
      pending.delete(entry.index);
      cache.set(entry.index, decoded);
      while (cache.size > CACHE_SIZE) cache.delete(cache.keys().next().value);
      return decoded;
    }, (error) => { pending.delete(entry.index); throw error; });
    job.promise = done;
    return done;
  }

  // ------------------------------------------------------------------ showing a case

  function show(index) {
    const entry = data.cases.find((c) => c.index === index);
    if (!entry) return;
    state.current = entry;
    document.querySelectorAll("tr.case.selected").forEach((r) => r.classList.remove("selected"));
    const row = document.querySelector('tr.case[data-index="' + index + '"]');
    if (row) row.classList.add("selected");
    byId("case-title").textContent = entry.id;
    setNotes(entry.notes);
    history.replaceState(null, "", "#case=" + encodeURIComponent(entry.id));
    if (!entry.file) {
      state.view = null;
      clearCanvas();
      message(entry.status === "failed" ? "Failed: " + entry.reason : "Nothing to show for this case.");
      return;
    }
    message("Loading " + entry.id + "…");
    loadCase(entry).then((view) => {
      if (state.current !== entry) return;
      message("");
      open(view);
    }, (error) => {
      if (state.current === entry) message(error.message);
    });
  }

  function open(view) {
    const was3d = !!state.view && state.view.shape[2] > 1;
    state.view = view;
    if (!was3d || view.shape[2] < 2) state.axis = 2; // keep the plane from one volume to the next
    state.slice = view.start.slice();
    fillAxes(view);
    setWindow(view.window[0], view.window[1], view);
    fillPresets(view);
    byId("reference-box").style.display = view.reference ? "" : "none";
    setNotes(view.notes);
    syncSlice();
    draw();
  }

  function planeAxes(axis) { return axis === 2 ? [0, 1] : axis === 1 ? [0, 2] : [1, 2]; }

  function planeName(view, axis) {
    if (!view.axes) return ["x", "y", "z"][axis] + " (slices across " + ["x", "y", "z"][axis] + ")";
    const code = view.axes[axis];
    const name = "SI".includes(code) ? "axial" : "AP".includes(code) ? "coronal" : "sagittal";
    return name + " (" + ["x", "y", "z"][axis] + ")";
  }

  function fillAxes(view) {
    const select = byId("axis");
    select.textContent = "";
    [2, 1, 0].forEach((axis) => {
      const option = document.createElement("option");
      option.value = String(axis);
      option.textContent = planeName(view, axis);
      select.appendChild(option);
    });
    select.value = String(state.axis);
    byId("axis-box").style.display = view.shape[2] > 1 ? "" : "none";
  }

  function fillPresets(view) {
    const select = byId("preset");
    select.textContent = "";
    const names = ["default", "full range"];
    if (view.image && view.low < -500) names.push(...Object.keys(PRESETS));
    names.forEach((n) => {
      const option = document.createElement("option");
      option.value = option.textContent = n;
      select.appendChild(option);
    });
    select.disabled = !view.image;
  }

  function setWindow(level, width, view) {
    const lo = view.image ? view.low : 0, hi = view.image ? view.high : 1;
    const span = hi - lo;
    const w = byId("window-width"), l = byId("window-level");
    w.min = String(span / 1000); w.max = String(span * 2); w.step = String(span / 1000);
    l.min = String(lo - span / 2); l.max = String(hi + span / 2); l.step = String(span / 1000);
    state.width = Math.max(width, span / 1000);
    state.level = level;
    w.value = String(state.width);
    l.value = String(level);
    w.disabled = l.disabled = !view.image;
    showWindow();
  }

  function showWindow() {
    byId("width-out").textContent = fmt(state.width);
    byId("level-out").textContent = fmt(state.level);
  }

  function fmt(x) { return Math.abs(x) >= 100 || x === 0 ? x.toFixed(0) : x.toPrecision(3); }

  function syncSlice() {
    const view = state.view;
    const slider = byId("slice");
    const n = view.shape[state.axis];
    slider.max = String(n - 1);
    slider.value = String(state.slice[state.axis]);
    slider.disabled = n < 2;
    byId("slice-out").textContent = (state.slice[state.axis] + 1) + " / " + n;
  }

  function setNotes(notes) {
    const list = byId("case-notes");
    list.textContent = "";
    (notes || []).forEach((n) => {
      const li = document.createElement("li");
      li.textContent = n;
      list.appendChild(li);
    });
  }

  function message(text) { byId("viewer-message").textContent = text; }

  function clearCanvas() {
    const canvas = byId("view");
    canvas.width = canvas.height = 1;
    canvas.style.width = canvas.style.height = "1px";
  }

  // ------------------------------------------------------------------ drawing

  function sliceIndex(view, axis, slice) {
    // Voxel index of every canvas pixel (row-major), honouring display flips.
    const shape = view.shape;
    const strides = [shape[1] * shape[2], shape[2], 1];
    const [h, v] = planeAxes(axis);
    const W = shape[h], H = shape[v];
    const codes = view.axes;
    const flipH = !!codes && "RA".includes(codes[h]);
    const flipV = !!codes && "AS".includes(codes[v]);
    const base = slice * strides[axis];
    const index = new Int32Array(W * H);
    for (let j = 0; j < H; j++) {
      const b = (flipV ? H - 1 - j : j) * strides[v] + base;
      for (let i = 0; i < W; i++) index[j * W + i] = b + (flipH ? W - 1 - i : i) * strides[h];
    }
    return { index, W, H, h, v };
  }

  function draw() {
    const view = state.view;
    if (!view) return;
    const { index, W, H, h, v } = sliceIndex(view, state.axis, state.slice[state.axis]);
    const canvas = byId("view");
    if (canvas.width !== W) canvas.width = W;
    if (canvas.height !== H) canvas.height = H;
    fitCanvas(canvas, W * view.spacing[h], H * view.spacing[v]);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    const picture = ctx.createImageData(W, H);
    const px = picture.data;
    const alpha = state.opacity;
    const low = state.level - state.width / 2, gain = 255 / state.width;
    const { image, mask, reference } = view;
    for (let p = 0; p < W * H; p++) {
      const k = index[p];
      let g = 0;
      if (image) {
        g = ((view.offset + image[k] * view.scale) - low) * gain;
        g = g < 0 ? 0 : g > 255 ? 255 : g;
      }
      let r = g, gr = g, b = g;
      const label = mask[k];
      if (label && state.visible[label] && colours[label]) {
        const c = colours[label];
        r = r * (1 - alpha) + c[0] * alpha;
        gr = gr * (1 - alpha) + c[1] * alpha;
        b = b * (1 - alpha) + c[2] * alpha;
      }
      const o = p * 4;
      px[o] = r; px[o + 1] = gr; px[o + 2] = b; px[o + 3] = 255;
    }
    if (reference && state.showReference) {
      for (let j = 0; j < H; j++) {
        for (let i = 0; i < W; i++) {
          const p = j * W + i;
          const label = reference[index[p]];
          if (!label || !state.visible[label] || !colours[label]) continue;
          const edge = i === 0 || j === 0 || i === W - 1 || j === H - 1 ||
            reference[index[p - 1]] !== label || reference[index[p + 1]] !== label ||
            reference[index[p - W]] !== label || reference[index[p + W]] !== label;
          if (!edge) continue;
          const c = colours[label], o = p * 4;
          px[o] = c[0]; px[o + 1] = c[1]; px[o + 2] = c[2];
        }
      }
    }
    ctx.putImageData(picture, 0, 0);
  }

  function fitCanvas(canvas, widthMm, heightMm) {
    const box = byId("stage").clientWidth || 500;
    const maxH = Math.max(240, window.innerHeight * 0.62);
    let ratio = heightMm / widthMm;
    if (!isFinite(ratio) || ratio <= 0) ratio = 1;
    ratio = Math.min(8, Math.max(1 / 8, ratio));
    let w = box, hgt = box * ratio;
    if (hgt > maxH) { hgt = maxH; w = hgt / ratio; }
    canvas.style.width = Math.round(w) + "px";
    canvas.style.height = Math.round(hgt) + "px";
  }

  function readout(event) {
    const view = state.view;
    if (!view) return;
    const canvas = byId("view");
    const { index, W, H } = sliceIndex(view, state.axis, state.slice[state.axis]);
    const i = Math.floor(event.offsetX / canvas.clientWidth * W);
    const j = Math.floor(event.offsetY / canvas.clientHeight * H);
    if (i < 0 || j < 0 || i >= W || j >= H) return;
    const k = index[j * W + i];
    const [ny, nz] = [view.shape[1], view.shape[2]];
    const x = Math.floor(k / (ny * nz)), y = Math.floor(k / nz) % ny, z = k % nz;
    const name = (label) => label ? (data.classes[label - 1] || {}).name : "background";
    let text = "voxel (" + x + ", " + y + ", " + z + ") of the shown grid";
    if (view.image) text += " · value " + fmt(view.offset + view.image[k] * view.scale);
    text += " · prediction: " + name(view.mask[k]);
    if (view.reference) text += " · reference: " + name(view.reference[k]);
    byId("readout").textContent = text;
  }

  // ------------------------------------------------------------------ controls

  function step(delta) {
    const view = state.view;
    if (!view) return;
    const n = view.shape[state.axis];
    state.slice[state.axis] = Math.min(n - 1, Math.max(0, state.slice[state.axis] + delta));
    syncSlice();
    draw();
  }

  function neighbour(delta) {
    if (!viewable.length) return;
    const at = state.current ? viewable.findIndex((c) => c.index === state.current.index) : -1;
    const next = viewable[(at + delta + viewable.length) % viewable.length];
    show(next.index);
  }

  byId("slice").addEventListener("input", (e) => {
    if (!state.view) return;
    state.slice[state.axis] = Number(e.target.value);
    syncSlice();
    draw();
  });
  byId("axis").addEventListener("change", (e) => {
    state.axis = Number(e.target.value);
    syncSlice();
    draw();
  });
  byId("opacity").addEventListener("input", (e) => {
    state.opacity = Number(e.target.value) / 100;
    byId("opacity-out").textContent = e.target.value + "%";
    draw();
  });
  byId("window-width").addEventListener("input", (e) => { state.width = Number(e.target.value); showWindow(); draw(); });
  byId("window-level").addEventListener("input", (e) => { state.level = Number(e.target.value); showWindow(); draw(); });
  byId("preset").addEventListener("change", (e) => {
    const view = state.view;
    if (!view) return;
    const name = e.target.value;
    const lw = name === "default" ? view.window : name === "full range"
      ? [(view.low + view.high) / 2, view.high - view.low] : PRESETS[name];
    setWindow(lw[0], lw[1], view);
    draw();
  });
  byId("show-reference").addEventListener("change", (e) => { state.showReference = e.target.checked; draw(); });
  document.querySelectorAll("#legend input[data-class]").forEach((box) => {
    box.addEventListener("change", () => { state.visible[Number(box.dataset.class)] = box.checked; draw(); });
  });
  byId("prev").addEventListener("click", () => neighbour(-1));
  byId("next").addEventListener("click", () => neighbour(1));
  const canvas = byId("view");
  canvas.addEventListener("wheel", (e) => { if (state.view) { e.preventDefault(); step(e.deltaY > 0 ? 1 : -1); } }, { passive: false });
  canvas.addEventListener("mousemove", readout);
  document.addEventListener("keydown", (e) => {
    const tag = (e.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "select" || tag === "textarea") return;
    if (e.key === "ArrowUp" || e.key === "ArrowDown") { e.preventDefault(); step(e.key === "ArrowUp" ? 1 : -1); }
    else if (e.key === "n") neighbour(1);
    else if (e.key === "p") neighbour(-1);
  });
  window.addEventListener("resize", () => draw());

  // ------------------------------------------------------------------ the table

  const body = document.querySelector("#case-table tbody");
  body.addEventListener("click", (e) => {
    const row = e.target.closest("tr.case");
    if (row) show(Number(row.dataset.index));
  });
  body.addEventListener("keydown", (e) => {
    const row = e.target.closest("tr.case");
    if (row && e.key === "Enter") show(Number(row.dataset.index));
  });
  document.querySelectorAll("#case-table thead th[data-type]").forEach((th) => {
    th.addEventListener("click", () => sortBy(th));
  });

  function cellValue(row, column, numeric) {
    const cell = row.children[column];
    if (!numeric) return cell.textContent;
    const value = cell.dataset.value;
    return value === undefined || value === "" ? NaN : Number(value);
  }

  function sortBy(th) {
    const column = Array.prototype.indexOf.call(th.parentNode.children, th);
    const numeric = th.dataset.type === "num";
    const ascending = !th.classList.contains("sorted-asc");
    th.parentNode.querySelectorAll("th").forEach((t) => t.classList.remove("sorted-asc", "sorted-desc"));
    th.classList.add(ascending ? "sorted-asc" : "sorted-desc");
    const rows = Array.from(body.querySelectorAll("tr.case"));
    rows.sort((a, b) => {
      const x = cellValue(a, column, numeric), y = cellValue(b, column, numeric);
      if (numeric) {
        if (isNaN(x) && isNaN(y)) return 0;
        if (isNaN(x)) return 1; // unscored rows last either way
        if (isNaN(y)) return -1;
        return ascending ? x - y : y - x;
      }
      return ascending ? x.localeCompare(y, undefined, { numeric: true }) : y.localeCompare(x, undefined, { numeric: true });
    });
    rows.forEach((r) => body.appendChild(r));
  }

  byId("filter").addEventListener("input", (e) => {
    const text = e.target.value.trim().toLowerCase();
    body.querySelectorAll("tr.case").forEach((row) => {
      row.hidden = text !== "" && !row.querySelector("td.id").textContent.toLowerCase().includes(text);
    });
  });

  window.medsegReview = { receive, show, state, cases: data.cases };

  // Open the case named in the address (#case=ID), else the first one that can be shown.
  let wanted = "";
  try { wanted = decodeURIComponent((location.hash.match(/^#case=(.*)$/) || [])[1] || ""); } catch (ignored) { /* bad link */ }
  const first = data.cases.find((c) => c.id === wanted) || viewable[0];
  if (first) show(first.index);
})();
