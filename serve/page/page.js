// The r2r-serve page: renders in, photos out, each with its denoising steps streamed from the server
// (POST /v1/translate/events, server-sent events). Everything it loads comes from this server.
"use strict";

const FIELDS = ["steps", "strength", "guidance", "tac_ratio"];
const $ = (id) => document.getElementById(id);
let defaults = {};

function setStatus(text, bad = false) {
  $("status").textContent = text;
  $("status").classList.toggle("bad", bad);
}

function showValue(input) {
  input.parentElement.querySelector("output").textContent = input.value;
}

function applyDefaults() {
  for (const name of FIELDS) {
    if (defaults[name] === undefined) continue;
    const input = $(name);
    input.value = defaults[name];
    showValue(input);
  }
}

async function connect() {
  try {
    const r = await fetch("readyz");
    const info = await r.json();
    if (!info.ready) {
      setStatus("the service is starting; retrying", true);
      setTimeout(connect, 2000);
      return;
    }
    defaults = info.params || {};
    applyDefaults();
    setStatus(`ready: ${info.backend}, batch ${info.max_batch_size}`);
    document.body.dataset.ready = "1";
  } catch (err) {
    setStatus(`cannot reach the service (${err})`, true);
    setTimeout(connect, 2000);
  }
}

function query() {
  const q = new URLSearchParams();
  for (const name of FIELDS) {
    if (String(defaults[name]) !== $(name).value) q.set(name, $(name).value);
  }
  return q.toString();
}

// Server-sent events from a fetch body: blocks separated by a blank line, each "event:" and "data:" lines.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield { kind, data: JSON.parse(data) };
    }
  }
}

function pngBlob(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

async function translate(file) {
  const row = $("row").content.firstElementChild.cloneNode(true);
  const [renderImg, photoImg] = row.querySelectorAll("img");
  const bar = row.querySelector("progress");
  const state = row.querySelector(".state");
  const link = row.querySelector("a.download");
  row.querySelector(".render figcaption").textContent = file.name;
  row.dataset.name = file.name;
  renderImg.src = URL.createObjectURL(file);
  $("results").prepend(row);
  const fail = (message) => {
    row.classList.add("failed");
    row.dataset.state = "failed";
    state.textContent = message;
  };
  const headers = { "Content-Type": file.type || "image/png" };
  if ($("token").value) headers.Authorization = `Bearer ${$("token").value}`;
  let response;
  try {
    response = await fetch(`v1/translate/events?${query()}`, { method: "POST", body: file, headers });
  } catch (err) {
    return fail(`not sent (${err})`);
  }
  if (!response.ok) {
    let message = `${response.status}`;
    try { message += `: ${(await response.json()).error}`; } catch { /* not JSON */ }
    if (response.status === 401) $("access").open = true;
    return fail(message);
  }
  state.textContent = "running";
  for await (const ev of events(response)) {
    if (ev.kind === "step") {
      bar.max = ev.data.total;
      bar.value = ev.data.done;
      row.dataset.steps = ev.data.done;
      state.textContent = `step ${ev.data.done} / ${ev.data.total}`;
    } else if (ev.kind === "done") {
      const url = URL.createObjectURL(pngBlob(ev.data.png));
      photoImg.src = url;
      bar.max = 1;
      bar.value = 1;
      state.textContent = `${ev.data.run_s.toFixed(2)} s (batch ${ev.data.batch})`;
      link.href = url;
      link.download = file.name.replace(/\.[^.]*$/, "") + ".r2r.png";
      link.hidden = false;
      row.dataset.state = "done";
    } else if (ev.kind === "error") {
      return fail(`${ev.data.status}: ${ev.data.error}`);
    }
  }
  if (row.dataset.state !== "done") fail("the stream ended without a result");
}

function take(files) {
  for (const file of files) translate(file);
}

for (const name of FIELDS) $(name).addEventListener("input", (e) => showValue(e.target));
$("reset").addEventListener("click", applyDefaults);
$("token").value = sessionStorage.getItem("r2r-token") || "";
$("token").addEventListener("change", () => sessionStorage.setItem("r2r-token", $("token").value));
$("files").addEventListener("change", (e) => { take(e.target.files); e.target.value = ""; });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); take(e.dataTransfer.files); });
connect();
