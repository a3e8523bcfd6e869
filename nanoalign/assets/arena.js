"use strict";
const $ = id => document.getElementById(id), buttons = [...document.querySelectorAll("button[data-w]")];
const keys = {1: "A", ArrowLeft: "A", 2: "B", ArrowRight: "B", 3: "tie", 4: "both_bad"};
const say = text => { $("status").textContent = text; }, setReady = on => buttons.forEach(b => { b.disabled = !on; });
let pair = null, hasPrompts = false, lastS = null;
async function api(path, body) {
  const r = await fetch(path, body && {method: "POST", body: JSON.stringify(body),
                                       headers: {"Content-Type": "application/json"}});
  const j = await r.json();
  if (r.ok) return j;
  throw new Error(j.error || r.statusText);
}
async function refresh() {
  const s = await api("/api/state");
  $("warning").textContent = s.warning; $("warning").hidden = !s.warning; $("board").textContent = s.board;
  hasPrompts = s.has_prompts; lastS = s.last_s; $("next").disabled = !hasPrompts;
}
async function ask(typed) {  // the server replies once both answers are written; a clock runs meanwhile
  setReady(false); pair = null; $("prompt").textContent = typed ?? ""; $("a").textContent = $("b").textContent = "";
  const t0 = Date.now(), tick = () => {
    const s = (Date.now() - t0) / 1000;
    say(`Writing the two answers... ${s.toFixed(1)} s` + (lastS ? ` (the last pair took ${lastS.toFixed(1)} s)` : ""));
    $("progress").value = lastS ? Math.min(s / lastS, 0.99) : 0;
  }, timer = setInterval(tick, 200);
  tick();
  try {
    const p = await api("/api/pair", typed === undefined ? {} : {prompt: typed}).finally(() => clearInterval(timer));
    for (const id of ["prompt", "a", "b"]) $(id).textContent = p[id];
    pair = p.id; say("Which answer is better?"); setReady(true); $("progress").value = 1;
  } catch (e) { say("Error: " + e.message); }
}
async function vote(winner, id = pair) {
  if (id === null) return;
  pair = null; setReady(false); say("Recording the vote...");
  try {
    const r = await api("/api/vote", {id, winner});
    $("reveal").textContent = `Vote ${r.votes} recorded: A was ${r.a}, B was ${r.b}.`;
  } catch (e) { say("Error: " + e.message); pair = id; return setReady(true); }
  await refresh();
  if (hasPrompts) ask(); else say("Type the next prompt.");
}
buttons.forEach(b => b.addEventListener("click", () => vote(b.dataset.w)));
document.addEventListener("keydown", e => {
  if (e.target.tagName === "TEXTAREA" || e.ctrlKey || e.metaKey || e.altKey) return;
  if (keys[e.key]) vote(keys[e.key]); else if (e.key === "n" && hasPrompts) ask();
});
$("ask").addEventListener("submit", e => { e.preventDefault(); if ($("typed").value.trim()) ask($("typed").value); });
$("next").addEventListener("click", () => ask());
refresh().then(() => hasPrompts ? ask() : say("Type a prompt to start."));
